"""A model's config.json, HF style (the GGUF reader writes one too): reading it, the dimensions
the engine needs, and its rotary embedding frequencies. Names follow the engine's Config:
vocab_size, d_model, d_ff, n_layers, n_heads, n_kv_heads, head_dim."""
from __future__ import annotations

import json
import math

import numpy as np


def read_json(path: str):
    """Loads a JSON file; malformed JSON raises ValueError naming the file (and so does a \\ud800
    escape: JSON can spell a lone surrogate, which no text holds and the engine cannot take)."""
    with open(path) as f:
        try:
            out = json.load(f)
            json.dumps(out, ensure_ascii=False).encode("utf-8")
            return out
        except (json.JSONDecodeError, UnicodeError) as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None


def read_config(path: str) -> dict:
    """Loads a config.json and checks the types of the fields flashmem reads (check_config)."""
    cfg = read_json(path)
    check_config(cfg, path)
    return cfg


_INT, _NUMBER, _STR, _BOOL, _LIST, _OBJECT = "an integer", "a number", "a string", "true or false", "a list", \
    "an object"
_IS = {_INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
       _NUMBER: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
       _STR: lambda v: isinstance(v, str), _BOOL: lambda v: isinstance(v, bool),
       _LIST: lambda v: isinstance(v, list), _OBJECT: lambda v: isinstance(v, dict)}
# the config fields flashmem reads and what each must be when present and not null
CONFIG_FIELDS = {
    "model_type": _STR, "torch_dtype": _STR, "dtype": _STR, "vocab_size": _INT, "hidden_size": _INT,
    "intermediate_size": _INT, "num_hidden_layers": _INT, "num_attention_heads": _INT, "num_key_value_heads": _INT,
    "head_dim": _INT, "max_position_embeddings": _INT, "rms_norm_eps": _NUMBER, "tie_word_embeddings": _BOOL,
    "attention_bias": _BOOL, "hidden_act": _STR, "hidden_activation": _STR, "query_pre_attn_scalar": _NUMBER,
    "attn_logit_softcapping": _NUMBER, "final_logit_softcapping": _NUMBER, "rope_theta": _NUMBER,
    "rope_local_base_freq": _NUMBER, "rope_scaling": _OBJECT, "rope_parameters": _OBJECT,
    "flashmem_rope_freq_factors": _LIST, "sliding_window": _INT, "use_sliding_window": _BOOL, "layer_types": _LIST,
    "sliding_window_pattern": _INT, "_sliding_window_pattern": _INT, "flashmem": _OBJECT,
}
ROPE_FIELDS = {"rope_type": _STR, "type": _STR, "rope_theta": _NUMBER, "factor": _NUMBER, "low_freq_factor": _NUMBER,
               "high_freq_factor": _NUMBER, "original_max_position_embeddings": _NUMBER}
FLASHMEM_FIELDS = {"format_version": _INT, "dtype": _STR, "source": _STR, "ffn": _OBJECT}
FFN_FIELDS = {"file": _STR, "layout": _STR, "bundles": _STR, "bundle_format": _LIST, "bundle_bytes": _INT,
              "align": _INT, "stride": _INT}


def _check_fields(section: dict, fields: dict, where: str, prefix: str = "") -> None:
    for key, kind in fields.items():
        v = section.get(key)
        if v is not None and not _IS[kind](v):
            raise ValueError(f"{where}: config field '{prefix}{key}' must be {kind}, got {v!r:.80}")


def check_config(cfg, where: str) -> None:
    """Raises ValueError naming the field unless every field flashmem reads from an HF-style
    config (CONFIG_FIELDS, the rope sections, a converted folder's "flashmem" section) has its
    JSON type; their values are checked where they are used (model_dims, rope_inv_freq, ...)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the config is not a JSON object")
    _check_fields(cfg, CONFIG_FIELDS, where)
    if cfg.get("rope_scaling"):
        _check_fields(cfg["rope_scaling"], ROPE_FIELDS, where, "rope_scaling.")
    for key, v in (cfg.get("rope_parameters") or {}).items():  # per layer type, or one set
        if key in ("full_attention", "sliding_attention"):
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"{where}: config field 'rope_parameters.{key}' must be an object, got {v!r:.80}")
            _check_fields(v or {}, ROPE_FIELDS, where, f"rope_parameters.{key}.")
        elif key in ROPE_FIELDS:
            _check_fields(cfg["rope_parameters"], {key: ROPE_FIELDS[key]}, where, "rope_parameters.")
    for key, kind, what in (("flashmem_rope_freq_factors", _NUMBER, "numbers"), ("layer_types", _STR, "strings")):
        if any(not _IS[kind](x) for x in cfg.get(key) or []):
            raise ValueError(f"{where}: config field '{key}' must be a list of {what}")
    fm = cfg.get("flashmem")
    if fm is not None:
        _check_fields(fm, FLASHMEM_FIELDS, where, "flashmem.")
        if not isinstance(fm.get("dtype"), str) or not isinstance(fm.get("ffn"), dict):
            raise ValueError(f"{where}: config section 'flashmem' needs 'dtype' and 'ffn'; convert the model again")
        _check_fields(fm["ffn"], FFN_FIELDS, where, "flashmem.ffn.")
        if any(not isinstance(x, str) for x in fm["ffn"].get("bundle_format") or []):
            raise ValueError(f"{where}: config field 'flashmem.ffn.bundle_format' must be a list of format names")


MAX_DIM = 2 ** 31 - 1  # the engine's dimensions are 32-bit


def model_dims(cfg: dict, where: str) -> dict:
    """Normalised engine dimensions from an HF-style config; errors name the field."""
    def need(key, default=None):
        v = cfg.get(key)
        if default is not None and not v:  # absent, null or 0: the default
            v = default
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_DIM:
            raise ValueError(f"{where}: config field '{key}' must be a positive integer below 2^31, got {v!r:.80}")
        return v

    d, nh = need("hidden_size"), need("num_attention_heads")
    nkv = need("num_key_value_heads", nh)
    hd = need("head_dim", d // nh)
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
        factors = np.asarray(cfg["flashmem_rope_freq_factors"], np.float32)
        if factors.shape != inv.shape:
            raise ValueError(f"config field 'flashmem_rope_freq_factors' has {factors.size} factors, the rotary "
                             f"embedding {inv.size} frequencies")
        inv = (inv / factors).astype(np.float32)
    if scaling:
        def need(key):
            if not isinstance(scaling.get(key), (int, float)):
                raise ValueError(f"rope scaling field '{key}' must be a number, got {scaling.get(key)!r:.80}")
            return scaling[key]

        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind == "linear":
            inv = (inv / np.float32(need("factor"))).astype(np.float32)
        elif kind == "llama3":
            factor, lo, hi = need("factor"), need("low_freq_factor"), need("high_freq_factor")
            old = need("original_max_position_embeddings")
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
    if not isinstance(window, int) or not 0 < window <= MAX_DIM:
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
