"""Flash offloading options: DRAM budget parsing, the FFN file layouts the engine streams from,
and per-generation statistics.

Layouts of the FFN on disk (both 4096-byte aligned, for direct I/O):
  bundled    ffn_bundles.safetensors (written by `flashmem convert`): neuron i of layer l is one
             padded row [gate i | up i | down column i], so one read fetches one neuron.
  unbundled  ffn_unbundled.safetensors (written by `write_unbundled`, for the benchmark): the gate,
             up and transposed down matrices of each layer apart, so a neuron takes three reads.
"""
from __future__ import annotations

import os
import re

import numpy as np

from . import safetensors_io as st

UNBUNDLED_FILE = "ffn_unbundled.safetensors"
PREDICTOR_FILE = "predictor.safetensors"

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_bytes(v, name: str = "dram_budget") -> int:
    """200MB, 1.5GiB, 300e6 or an int -> bytes."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a size such as '200MB' or a number of bytes, got {v!r}")
    if isinstance(v, (int, float)):
        n = v
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", v)) \
            and m.group(2).lower() in _UNITS:
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{name} must be a size such as '200MB' or a number of bytes, got {v!r}")
    if not n > 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return int(n)


def layout(folder: str, config: dict, kind: str = "bundled") -> dict:
    """The byte layout of the FFN file the engine streams: path and, per layer, where each piece
    of neuron i starts (base + i * stride, `bytes` long)."""
    d, ff, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    esz = 4 if config["flashmem"]["dtype"] == "f32" else 2
    if kind == "bundled":
        path = os.path.join(folder, config["flashmem"]["ffn"].get("file", "ffn_bundles.safetensors"))
        infos, _ = st.read_header(path)
        bases = []
        for l in range(n_layers):
            info = infos.get(f"model.layers.{l}.mlp.bundles")
            if info is None:
                raise ValueError(f"{path}: tensor 'model.layers.{l}.mlp.bundles' is missing")
            if info.shape[0] != ff or info.shape[1] < 3 * d:
                raise ValueError(f"{path}: tensor 'model.layers.{l}.mlp.bundles' has shape {info.shape}, "
                                 f"expected ({ff}, >= {3 * d})")
            bases.append([info.offset])
        stride = infos["model.layers.0.mlp.bundles"].shape[1] * esz
        return dict(path=path, piece_base=bases, piece_stride=[stride], piece_bytes=[3 * d * esz])
    if kind == "unbundled":
        path = os.path.join(folder, UNBUNDLED_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; write it with flashmem.flash.write_unbundled()")
        infos, _ = st.read_header(path)
        bases = [[infos[f"model.layers.{l}.mlp.{k}"].offset for k in ("gate", "up", "down_t")]
                 for l in range(n_layers)]
        return dict(path=path, piece_base=bases, piece_stride=[d * esz] * 3, piece_bytes=[d * esz] * 3)
    raise ValueError(f"ffn layout must be 'bundled' or 'unbundled', got {kind!r}")


def write_unbundled(folder: str, config: dict) -> str:
    """Writes the FFN as three separate matrices per layer (gate, up, down transposed), each
    4096-aligned, for comparing against the bundled layout. Returns the path."""
    out = os.path.join(folder, UNBUNDLED_FILE)
    if os.path.isfile(out):
        return out
    d, ff, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tag = config["flashmem"]["dtype"]
    src = os.path.join(folder, config["flashmem"]["ffn"].get("file", "ffn_bundles.safetensors"))
    infos, _ = st.read_header(src)
    specs = [(f"model.layers.{l}.mlp.{k}", tag, (ff, d)) for l in range(n_layers) for k in ("gate", "up", "down_t")]
    w = st.Writer(out + ".part", specs, {"layout": "unbundled"}, align=4096)
    for l in range(n_layers):
        b = st.to_f32(st.load_tensor(src, infos[f"model.layers.{l}.mlp.bundles"]), tag)
        for j, k in enumerate(("gate", "up", "down_t")):
            w.write(f"model.layers.{l}.mlp.{k}", np.ascontiguousarray(b[:, j * d:(j + 1) * d]))
    w.close()
    with open(out + ".part", "ab") as f:  # whole 4096-byte blocks, so an aligned read never passes the end
        f.write(b"\0" * (-f.tell() % 4096))
    os.replace(out + ".part", out)
    return out


def summarize(stats: dict, tokens: int, n_layers: int, ffn_bytes: int) -> dict:
    """Per-token figures from the engine's sparse FFN counters over `tokens` tokens."""
    tokens = max(tokens, 1)
    picked = stats["hits"] + stats["misses"]
    out = dict(
        tokens=tokens,
        bytes_read_per_token=stats["bytes_read"] / tokens,
        ffn_fraction_read_per_token=stats["bytes_read"] / tokens / ffn_bytes if ffn_bytes else 0.0,
        requests_per_token=stats["requests"] / tokens,
        neuron_cache_hit_rate=stats["hits"] / picked if picked else 0.0,
        io_ms_per_token=1e3 * stats["io_s"] / tokens,
        select_ms_per_token=1e3 * stats["select_s"] / tokens,
        compute_ms_per_token=1e3 * stats["compute_s"] / tokens,
        read_bandwidth_gbps=stats["bytes_read"] / stats["read_s"] / 1e9 if stats["read_s"] else 0.0,
        neurons_picked_per_layer=stats["selected"] / tokens / n_layers,
        neurons_computed_per_layer=stats["computed"] / tokens / n_layers,
        cache_rows_per_layer=stats["cache_rows"],
        direct_io=stats["direct_io"],
    )
    return out
