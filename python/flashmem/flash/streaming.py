"""Flash offloading, the Python side: the engine's sparse FFN configured from load()'s options
(where the FFN lives, the DRAM budget, the predictor), the FFN file layouts it streams from, and
per-token statistics. The streaming itself (selection, reads, neuron cache, compute) is C++:
csrc/ffn/sparse_ffn.h, flash_reads.h, neuron_cache.h, predictor.h.

Layouts of the FFN on disk:
  bundled    ffn_bundles.safetensors (written by `flashmem convert`): neuron i of layer l is one
             row [gate i | up i | down column i], so one read fetches one neuron. Float bundles
             are padded to 4096 bytes; block-format bundles (about 1.3 KB for SmolLM2 in q4_1) are
             packed, and a read covers the aligned 4096-byte blocks a bundle spans.
  unbundled  ffn_unbundled.safetensors (written by `write_unbundled`, for the benchmark; float
             models): the gate, up and transposed down matrices of each layer apart (4096-byte
             aligned), so a neuron takes three reads.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np

from .. import _core
from ..checkpoints import safetensors_io as st
from ..checkpoints.convert import BUNDLE_FILE

UNBUNDLED_FILE = "ffn_unbundled.safetensors"
PREDICTOR_FILE = "predictor.safetensors"
# the predictor's tensors per layer, "model.layers.{l}.mlp.predictor.{part}" (csrc/ffn/predictor.h)
PREDICTOR_PARTS = ("gate_sign", "up_sign", "gate_row", "up_row", "gate_col", "up_col", "outlier_dims",
                   "outlier_weight", "outlier_scale")
LOWRANK_PARTS = ("lowrank_in", "lowrank_out")  # the low-rank kind's

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


def available_dram() -> tuple[int, str]:
    """Bytes this process may still take, and where the figure comes from: its memory cgroup's
    limit less the cgroup's usage (v1 memory.limit_in_bytes / usage_in_bytes, v2 memory.max /
    memory.current; the page cache is charged there too) when a limit is set, and never more than
    the system's MemAvailable. Only anonymous memory counts as used (memory.stat: total_rss +
    total_shmem, v2 anon + shmem: Python's objects, the tokenizer, the engine); file pages, mapped
    (code of Python and its libraries) or not (files read while loading), the kernel gives back
    under the limit and reads again when needed: auto_budget keeps headroom for those in use."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    how = f"MemAvailable {avail}"
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        entries = []
    for hierarchy, controllers, path in entries:
        if "memory" in controllers.split(","):
            base, limit_file, usage_file = "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        elif hierarchy == "0" and os.path.isfile(f"/sys/fs/cgroup{path}/memory.max"):
            base, limit_file, usage_file = "/sys/fs/cgroup", "memory.max", "memory.current"
        else:
            continue
        try:
            with open(f"{base}{path}/{limit_file}") as f:
                limit = f.read().strip()
            with open(f"{base}{path}/{usage_file}") as f:
                usage = int(f.read())
            with open(f"{base}{path}/memory.stat") as f:
                stat = dict(line.split() for line in f if len(line.split()) == 2)
            if "total_rss" in stat:  # v1 (hierarchical figures)
                pinned = int(stat["total_rss"]) + int(stat.get("total_shmem", 0))
            else:  # v2
                pinned = int(stat["anon"]) + int(stat.get("shmem", 0))
            usage = min(usage, pinned)
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 1 << 60:
            left = int(limit) - usage
            if left < avail:
                avail, how = left, f"cgroup {base}{path}: limit {int(limit)} - anonymous {usage}"
        break
    return max(avail, 0), how


def auto_budget() -> tuple[int, str]:
    """dram_budget="auto": what the process may still take (available_dram), less headroom for
    what Python allocates while generating (logits, tokens) and for the file pages in use (the code
    of Python, numpy and the engine): 10%, at least 16 MiB."""
    avail, how = available_dram()
    return max(avail - max(avail // 10, 16 << 20), 0), how


def bundle_path(folder: str, config: dict) -> str:
    """The neuron-bundle file of a converted folder."""
    return os.path.join(folder, config["flashmem"]["ffn"].get("file", BUNDLE_FILE))


def configure(engine, folder: str, config: dict, offload, dram_budget, sparsity, window, ffn_layout="bundled",
              queue_depth=32, coalesce_gap=2, direct_io=True, cache_rows=None, cache_bias=0.0,
              expire_window=False, eviction="lru", read_ahead=None, staging_rows=0, budget_source=None,
              resident_bytes=0):
    """Checks load()'s FFN options and configures the engine's sparse FFN (before any weight is
    loaded). Returns (offload, dram_budget in bytes, the predictor file or None); offload None
    with sparsity 0 leaves the dense FFN in place. budget_source: how dram_budget was found
    (dram_budget="auto", resolved by the caller before the engine allocated anything); resident_bytes:
    what the weights the loader will load take in the engine (loading.weights_to_load)."""
    if offload not in (None, "none", "flash", "all"):
        raise ValueError(f"offload must be None, 'flash' (the FFN streamed), 'all' (every matrix) or 'auto' (flash "
                         f"where dram_budget allows, else all), got {offload!r}")
    offload = None if offload == "none" else offload
    options = sparse_options(sparsity=sparsity, window=window, queue_depth=queue_depth, coalesce_gap=coalesce_gap,
                             direct=direct_io, cache_rows=-1 if cache_rows is None else cache_rows,
                             cache_bias=cache_bias, expire=expire_window, eviction=eviction,
                             read_ahead=-1 if read_ahead is None else read_ahead, staging_rows=staging_rows)
    if dram_budget is not None and not offload:
        raise ValueError("dram_budget needs offload='flash' (without offloading every weight is in DRAM)")
    if budget_source and not dram_budget:
        raise ValueError(f"dram_budget='auto': nothing left to take ({budget_source})")
    budget = parse_bytes(dram_budget) if dram_budget is not None else None
    if not offload and not sparsity:
        return offload, budget, None
    if not config["flashmem"]["ffn"].get("file"):
        raise ValueError(f"{folder}: flash offloading and sparsity need the FFN as neuron bundles, which this "
                         "folder (converted by an older flashmem) lacks; convert the model again")
    predictor = None
    if sparsity:
        predictor = os.path.join(folder, PREDICTOR_FILE)
        if not os.path.isfile(predictor):
            raise FileNotFoundError(f"sparsity {sparsity} needs the sparsity predictor {predictor}, which is "
                                    f"missing: run `flashmem calibrate {folder} --data FILE` first")
    if predictor:
        try:
            options.predictor_rank = predictor_rank(predictor)
            options.validate()
        except ValueError as e:
            raise ValueError(f"{predictor}: {e}") from None
    file_layout = layout(folder, config, ffn_layout) if offload else None
    try:
        engine.configure_sparse("flash" if offload else "dram", options, budget or 0, bool(sparsity), file_layout,
                                int(resident_bytes))
    except ValueError as e:
        if budget_source:
            raise ValueError(f"{e} (dram_budget='auto' took {budget} bytes: {budget_source}, less headroom)") from None
        raise
    if offload and not engine.sparse_stats()["direct_io"]:
        warnings.warn(f"{file_layout.path}: the filesystem refused O_DIRECT; FFN reads go through the page cache, "
                      "which the DRAM budget does not count", RuntimeWarning, stacklevel=4)
    return offload, budget, predictor


def sparse_options(**fields) -> _core.SparseOptions:
    """A validated _core.SparseOptions with the given fields; a bad one raises ValueError naming it."""
    options = _core.SparseOptions()
    for name, value in fields.items():
        kind = type(getattr(options, name))
        try:
            if isinstance(value, bool) and kind is not bool:
                raise TypeError
            setattr(options, name, value)
        except TypeError:
            raise ValueError(f"SparseOptions.{name} must be a {kind.__name__}, got {value!r}") from None
    options.validate()
    return options


def predictor_rank(path: str) -> int:
    """The kind of the predictor file at `path`: 0 for the sign predictor, else the low-rank one's rank."""
    infos, _ = st.read_header(path)
    info = infos.get("model.layers.0.mlp.predictor.lowrank_in")
    if info is None:
        return 0
    if len(info.shape) != 2 or info.shape[0] % 2:
        raise ValueError(f"{path}: tensor '{info.name}' has shape {tuple(info.shape)}, expected (2 * rank, row bytes)")
    return int(info.shape[0]) // 2


def load_predictor(engine, path: str, n_layers: int) -> None:
    """Loads every layer's predictor tensors from `path` into the configured engine."""
    infos, _ = st.read_header(path)
    parts = LOWRANK_PARTS if predictor_rank(path) else PREDICTOR_PARTS
    for l in range(n_layers):
        for part in parts:
            name = f"model.layers.{l}.mlp.predictor.{part}"
            if name not in infos:
                raise ValueError(f"{path}: tensor '{name}' is missing; run `flashmem calibrate` again")
            info = infos[name]
            engine.load_tensor(f"pred_{part}", l, path, info.offset, info.tag, list(info.shape))


def bundle_bytes(config: dict) -> int:
    """Bytes of one neuron bundle (unpadded): 3 * d_model floats, or its three block-format pieces."""
    ffn = config["flashmem"]["ffn"]
    if ffn.get("bundle_bytes"):
        return int(ffn["bundle_bytes"])
    if config["flashmem"]["dtype"] not in st.TAG_SIZE:
        raise ValueError(f"config: flashmem.ffn.bundle_bytes is missing (bundles of dtype {config['flashmem']['dtype']!r})")
    return 3 * config["hidden_size"] * st.TAG_SIZE[config["flashmem"]["dtype"]]


def file_layout(path: str, piece_base: list, piece_stride: list, piece_bytes: list) -> _core.FileLayout:
    out = _core.FileLayout()
    out.path, out.piece_base, out.piece_stride, out.piece_bytes = path, piece_base, piece_stride, piece_bytes
    return out


def layout(folder: str, config: dict, kind: str = "bundled") -> _core.FileLayout:
    """The byte layout of the FFN file the engine streams: path and, per layer, where each piece
    of neuron i starts (base + i * stride, `bytes` long)."""
    d, ff, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    if kind == "bundled":
        path = bundle_path(folder, config)
        infos, _ = st.read_header(path)
        nbytes, bases = bundle_bytes(config), []
        for l in range(n_layers):
            info = infos.get(f"model.layers.{l}.mlp.bundles")
            if info is None:
                raise ValueError(f"{path}: tensor 'model.layers.{l}.mlp.bundles' is missing")
            stride = info.shape[1] * st.TAG_SIZE[info.tag] if len(info.shape) == 2 and info.tag in st.TAG_SIZE else 0
            if stride == 0 or info.shape[0] != ff or stride < nbytes:
                raise ValueError(f"{path}: tensor 'model.layers.{l}.mlp.bundles' has shape {info.shape}, "
                                 f"expected ({ff}, rows of at least {nbytes} bytes)")
            bases.append([info.offset])
        return file_layout(path, bases, [stride], [nbytes])
    if kind == "unbundled":
        if config["flashmem"]["ffn"].get("bundle_format"):
            raise ValueError("ffn_layout 'unbundled' is written for float models only; use 'bundled'")
        esz = 4 if config["flashmem"]["dtype"] == "f32" else 2
        path = os.path.join(folder, UNBUNDLED_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; write it with flashmem.flash.write_unbundled()")
        infos, _ = st.read_header(path)
        bases = [[infos[f"model.layers.{l}.mlp.{k}"].offset for k in ("gate", "up", "down_t")]
                 for l in range(n_layers)]
        return file_layout(path, bases, [d * esz] * 3, [d * esz] * 3)
    raise ValueError(f"ffn layout must be 'bundled' or 'unbundled', got {kind!r}")


def bundle_gate_up(folder: str, config: dict, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer `layer`'s gate and up matrices (d_ff, d_model) as f32, read from its neuron bundles."""
    import gguf

    d = config["hidden_size"]
    path = bundle_path(folder, config)
    infos, _ = st.read_header(path)
    info = infos[f"model.layers.{layer}.mlp.bundles"]
    raw = st.load_tensor(path, info)
    formats = config["flashmem"]["ffn"].get("bundle_format")
    if not formats or info.tag != "u8":  # float bundles (a GGUF's float FFN kept as it is too: f16 rows)
        b = st.to_f32(raw, info.tag)
        return b[:, :d], b[:, d:2 * d]
    out, at = [], 0
    for fmt in formats[:2]:
        qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        n = d // block * block_bytes
        out.append(np.asarray(gguf.quants.dequantize(np.ascontiguousarray(raw[:, at:at + n]), qtype), np.float32))
        at += n
    return out[0], out[1]


def write_unbundled(folder: str, config: dict) -> str:
    """Writes the FFN as three separate matrices per layer (gate, up, down transposed), each
    4096-aligned, for comparing against the bundled layout. Returns the path."""
    out = os.path.join(folder, UNBUNDLED_FILE)
    if os.path.isfile(out):
        return out
    d, ff, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tag = config["flashmem"]["dtype"]
    src = bundle_path(folder, config)
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


def summarize(engine, config: dict, tokens: int) -> dict:
    """Per-token figures from the engine's sparse FFN counters over `tokens` decoded tokens
    (GenerationResult.flash); empty for the dense engine."""
    stats = engine.sparse_stats()
    if not stats:
        return {}
    n_layers = config["num_hidden_layers"]
    ffn_bytes = bundle_bytes(config) * config["intermediate_size"] * n_layers
    tokens = max(tokens, 1)
    picked = stats["hits"] + stats["misses"]
    out = dict(
        tokens=tokens,
        bytes_read_per_token=stats["bytes_read"] / tokens,
        weights_read_per_token=engine.stream_bytes_read / tokens,  # offload="all": attention, LM head, embeddings
        ffn_fraction_read_per_token=stats["bytes_read"] / tokens / ffn_bytes if ffn_bytes else 0.0,
        requests_per_token=stats["requests"] / tokens,
        neuron_cache_hit_rate=stats["hits"] / picked if picked else 0.0,
        io_ms_per_token=1e3 * stats["io_s"] / tokens,  # the compute waited for reads
        reads_in_flight_ms_per_token=1e3 * stats["read_busy_s"] / tokens,
        # of the time reads were in flight, the share that ran under compute
        io_hidden=max(0.0, 1.0 - stats["read_s"] / stats["read_busy_s"]) if stats["read_busy_s"] else 0.0,
        select_ms_per_token=1e3 * stats["select_s"] / tokens,
        compute_ms_per_token=1e3 * stats["compute_s"] / tokens,
        read_bandwidth_gbps=stats["bytes_read"] / stats["read_busy_s"] / 1e9 if stats["read_busy_s"] else 0.0,
        neurons_picked_per_layer=stats["selected"] / tokens / n_layers,
        neurons_computed_per_layer=stats["computed"] / tokens / n_layers,
        cache_rows_per_layer=stats["cache_rows"],
        direct_io=stats["direct_io"],
        # reading a layer ahead (read_ahead): neurons read per token, the share the layer picked
        # (the predictor a layer ahead's precision), and the share of the misses they covered
        ahead_read_per_token=stats["ahead_read"] / tokens,
        ahead_precision=stats["ahead_used"] / stats["ahead_read"] if stats["ahead_read"] else 0.0,
        ahead_coverage=stats["ahead_used"] / stats["misses"] if stats["misses"] else 0.0,
    )
    return out
