"""flashmem: an inference engine for decoder LLMs on devices whose DRAM is smaller than the model.

    model = flashmem.load()                      # SmolLM2-135M-Instruct, fetched and converted once
    print(model.generate("The capital of France is", max_new_tokens=20).text)
"""
from __future__ import annotations

import hashlib
import json
import os

from . import _core
from .convert import FORMAT_VERSION, convert
from .default_model import cache_dir, default_gguf
from .memory import Memory, MemoryBank
from .model import GenerationResult, Model

__all__ = ["load", "convert", "Model", "GenerationResult", "is_converted", "MemoryBank", "Memory"]
__version__ = "0.1.0"


def is_converted(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            return "flashmem" in json.load(f)
    except (OSError, json.JSONDecodeError):
        return False


def _cached_conversion(src: str, dtype: str | None) -> str:
    """Converts a HF folder or GGUF file once into the cache; later loads reuse it."""
    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"model not found: {src}")
    files = [src] if os.path.isfile(src) else sorted(
        os.path.join(src, f) for f in os.listdir(src) if f.endswith((".json", ".safetensors")))
    key = hashlib.sha256(json.dumps(
        [FORMAT_VERSION, dtype] + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]).encode()).hexdigest()
    name = os.path.basename(src.rstrip("/")).removesuffix(".gguf")
    out = os.path.join(cache_dir(), "models", f"{name}-{dtype or 'auto'}-{key[:12]}")
    if not is_converted(out):
        convert(src, out, dtype=dtype)
    return out


def load(path: str | None = None, dtype: str | None = None, threads: int | None = None,
         max_context: int | None = None, offload: str | None = None, dram_budget=None, sparsity: float = 0.0,
         window: int = 5, **flash_options) -> Model:
    """Loads a model: a flashmem folder, a HF folder, or a GGUF file (the latter two are converted
    once into the cache folder, ~/.cache/flashmem or $FLASHMEM_CACHE). With no path, the default
    model SmolLM2-135M-Instruct. dtype: f32, f16 or bf16 weight storage (computation is f32);
    default f16 for GGUF, the checkpoint's dtype for HF. threads: default all cores available.
    max_context: KV-cache length, default the model's max_position_embeddings.

    Flash offloading: offload="flash" keeps the FFN weights in the converted folder's bundle file
    and reads the neurons each token needs with direct I/O into a neuron cache. dram_budget
    ("200MB", "1.5GiB" or bytes) bounds every byte the engine owns (resident weights, KV cache for
    max_context, predictor, buffers); the cache takes what is left, and a budget below the
    minimum raises ValueError stating it. sparsity: fraction of FFN neurons left out per token,
    chosen by the predictor that `flashmem calibrate` fits (0: all, exact). window: tokens a
    neuron stays in DRAM after its last use; the FFN also computes with those still in the
    window (default 5: the smallest window at which 50% sparsity stays within 3% of dense
    perplexity on held-out text; it costs compute, not reads). flash_options: ffn_layout
    ("bundled" or "unbundled"), queue_depth, coalesce_gap, direct_io, cache_rows (neuron cache
    rows per layer when no budget is given; default all), cache_bias (cached neurons' predictor
    scores count 1 + cache_bias times: fewer reads), expire_window (drop neurons from DRAM once
    they leave the window, as the paper does; by default they stay until the cache needs their
    rows), eviction ("lru": a full cache makes room by dropping the least recently used
    neurons; "hot": it keeps the neurons picked most often lately, by a count decayed 0.95 per
    token, and a new neuron only replaces a colder one)."""
    if dtype is not None and dtype not in ("f32", "f16", "bf16"):
        raise ValueError(f"dtype must be 'f32', 'f16' or 'bf16', got {dtype!r}")
    if path is None:
        path = default_gguf()
    path = os.fspath(path)
    if is_converted(path):
        with open(os.path.join(path, "config.json")) as f:
            stored = json.load(f)["flashmem"].get("dtype")
        if dtype is not None and dtype != stored:
            raise ValueError(f"{path} was converted with dtype {stored}; convert the source again with --dtype {dtype}")
    else:
        path = _cached_conversion(path, dtype)
    return Model(path, threads=threads, max_context=max_context, offload=offload, dram_budget=dram_budget,
                 sparsity=sparsity, window=window, **flash_options)
