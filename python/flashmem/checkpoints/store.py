"""The store: a folder for the files flashmem derives (~/.cache/flashmem, or $FLASHMEM_CACHE):
the default model's GGUF, and each converted model under models/."""
from __future__ import annotations

import hashlib
import json
import os

from .convert import FORMAT_VERSION, convert


def store_dir() -> str:
    d = os.environ.get("FLASHMEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashmem")
    os.makedirs(d, exist_ok=True)
    return d


def is_converted(path: str) -> bool:
    """Whether `path` is a flashmem folder (its config.json has a "flashmem" section)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            config = json.load(f)
    except (OSError, ValueError):  # not JSON, or not UTF-8: not a flashmem folder (load() says why)
        return False
    return isinstance(config, dict) and "flashmem" in config


def converted_folder(src: str, dtype: str | None) -> str:
    """The flashmem folder of a HF folder or GGUF file `src` in the store, converted on first use
    (keyed by the source files' names, sizes and times and by dtype); later loads reuse it."""
    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"model not found: {src}")
    files = [src] if os.path.isfile(src) else sorted(
        os.path.join(src, f) for f in os.listdir(src) if f.endswith((".json", ".safetensors")))
    key = hashlib.sha256(json.dumps(
        [FORMAT_VERSION, dtype] + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]).encode()).hexdigest()
    name = os.path.basename(src.rstrip("/")).removesuffix(".gguf")
    out = os.path.join(store_dir(), "models", f"{name}-{dtype or 'auto'}-{key[:12]}")
    if not is_converted(out):
        convert(src, out, dtype=dtype)
    return out
