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


def rope_inv_freq(cfg: dict, head_dim: int, layer_type: str = "full_attention") -> tuple[np.ndarray, float]:
    """Rotary inverse frequencies (float32) and attention scaling, as HF transformers computes them
    for rope types default, linear and llama3 (and llama.cpp's per-frequency factors). layer_type:
    "full_attention", or "sliding_attention" for the layers with a window where the model gives them
    their own rope (Gemma 3: rope_parameters per layer type, or rope_local_base_freq)."""
    params = cfg.get("rope_parameters") or {}
    if layer_type in params or "full_attention" in params:  # one set per layer type (transformers 5)
        params = params.get(layer_type) or params.get("full_attention") or {}
        if not isinstance(params, dict):
            raise ValueError(f"config field 'rope_parameters.{layer_type}' must be an object, got {params!r}")
        cfg = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    elif layer_type == "sliding_attention":  # transformers 4 names: a local base, no scaling
        base = float(cfg.get("rope_local_base_freq") or cfg.get("rope_theta") or 10000.0)
        cfg = {"rope_theta": base}
        params = {}
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


def layer_windows(cfg: dict, n_layers: int, where: str) -> list[int]:
    """The sliding window of each layer (0: the layer attends to every position): Gemma 3's
    layer_types (or, in older configs, every sliding_window_pattern-th layer global); Mistral's
    sliding_window on every layer; [] when no layer has one."""
    window = cfg.get("sliding_window")
    if window is None or cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window"):
        return []
    if not isinstance(window, int) or window <= 0:
        raise ValueError(f"{where}: config field 'sliding_window' must be a positive integer or null, got {window!r}")
    types = cfg.get("layer_types")
    if types is None and cfg.get("model_type") in GEMMA_TYPES:
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if types is None:
        return [window] * n_layers
    if not isinstance(types, list) or len(types) != n_layers or \
            any(t not in ("sliding_attention", "full_attention") for t in types):
        raise ValueError(f"{where}: config field 'layer_types' must list 'sliding_attention' or 'full_attention' "
                         f"for each of the {n_layers} layers")
    return [window if t == "sliding_attention" else 0 for t in types]


GEMMA_TYPES = ("gemma3_text",)
