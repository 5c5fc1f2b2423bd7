"""A model's config.json, HF style (the GGUF reader writes one too): reading it, the dimensions
the engine needs, and its rotary embedding frequencies. Names follow the engine's Config:
vocab_size, d_model, d_ff, n_layers, n_heads, n_kv_heads, head_dim."""
from __future__ import annotations

import json
import math

import numpy as np


def read_json(path: str):
    """Loads a JSON file; malformed JSON raises ValueError naming the file."""
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None


def model_dims(cfg: dict, where: str) -> dict:
    """Normalised engine dimensions from an HF-style config; errors name the field."""
    def need(key):
        v = cfg.get(key)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{where}: config field '{key}' must be a positive integer, got {v!r}")
        return v

    d, nh = need("hidden_size"), need("num_attention_heads")
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or d // nh
    if nh % nkv:
        raise ValueError(f"{where}: num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    return dict(vocab_size=need("vocab_size"), d_model=d, d_ff=need("intermediate_size"),
                n_layers=need("num_hidden_layers"), n_heads=nh, n_kv_heads=nkv, head_dim=hd)


def rope_inv_freq(cfg: dict, head_dim: int) -> tuple[np.ndarray, float]:
    """Rotary inverse frequencies (float32) and attention scaling, as HF transformers computes them
    for rope types default, linear and llama3 (and llama.cpp's per-frequency factors)."""
    params = cfg.get("rope_parameters") or {}
    base = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(base), exps)).astype(np.float32)
    if cfg.get("flashmem_rope_freq_factors"):
        inv = (inv / np.asarray(cfg["flashmem_rope_freq_factors"], np.float32)).astype(np.float32)
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind == "linear":
            inv = (inv / np.float32(scaling["factor"])).astype(np.float32)
        elif kind == "llama3":
            factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        elif kind != "default":
            raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    return inv, 1.0
