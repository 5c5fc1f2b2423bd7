"""`flashmem convert`: HF folder or GGUF -> the engine's own folder.

Layout of the output folder (FORMAT_VERSION 1), with dtype f32, f16 or bf16:
  config.json               HF config + a "flashmem" section (format version, dtype, FFN layout)
  tokenizer.json, tokenizer_config.json (+ generation_config.json when the source has one)
  model.safetensors         resident weights under HF names: embeddings, norms, attention, lm_head
  ffn_bundles.safetensors   per layer l, tensor "model.layers.{l}.mlp.bundles" of shape
                            (d_ff, stride): row i = [gate row i | up row i | down column i | zero pad],
                            stride * itemsize a multiple of `align` (4096), data section aligned too,
                            so every bundle starts at a 4096-byte file offset (one direct-I/O read
                            fetches one neuron)
With dtype "gguf" (a GGUF file's formats kept): model.safetensors also holds the FFN's gate_proj,
up_proj and down_proj matrices (the dense path computes with them), and each matrix in a block
format is stored as the bytes of its rows (U8, (rows, row bytes)), its format named in the
header's metadata "formats" (a JSON object, tensor name -> format). ffn_bundles.safetensors then
holds the same FFN as neuron bundles in block formats, for flash streaming and sparsity: per
layer a U8 tensor (d_ff, bundle bytes), row i = [gate row i | up row i | down column i], the gate
and up rows as the GGUF stores them. The GGUF's down blocks run along d_ff, so a down column is
either split (`bundle_down` "split", the default where the down matrix is q4_0, q4_1 or q8_0):
the column's own quants in the bundle, and per layer the tensor "model.layers.{l}.mlp.down_scales"
(d_ff/32, d_model, or 2*d_model with q4_1's mins) f16 of the scales 32 neurons share, which the
engine keeps resident (nothing requantized: csrc/ffn/bundled_ffn.h, BundleFormat); or requantized
along d_model (to `bundle_down`: q8_0, the fallback for other formats, or "same"). Bundles are
packed, not padded to 4096 bytes: a read covers the aligned blocks a bundle spans. config.json's
"ffn" section names the three formats ("bundle_format", the down one "<format>:split" when split)
and the bundle's bytes ("bundle_bytes").
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from tqdm.auto import tqdm

from . import safetensors_io as st
from .config import model_dims
from .gguf_file import GGUFSource
from .hf_folder import HFSource, layer_tensor_names

FORMAT_VERSION = 3  # 3: split down columns; 2: "gguf" folders hold block-format bundles too; 1: float folders
READABLE_VERSIONS = (1, 2, 3)
DTYPES = ("f32", "f16", "bf16")
KEEP_FORMATS = "gguf"  # the dtype that keeps a GGUF file's formats
BUNDLE_FILE = "ffn_bundles.safetensors"
RESIDENT_FILE = "model.safetensors"


def bundle_stride(d_model: int, dtype: str, align: int) -> int:
    """Elements per bundle row: 3*d_model rounded up so a row is a multiple of `align` bytes."""
    esz = 4 if dtype == "f32" else 2
    nbytes = -(-3 * d_model * esz // align) * align
    return nbytes // esz


def open_source(path: str):
    """The conversion source at `path`: a HF folder or a .gguf file. Both give an HF-style
    `config`, `tensor(name)` as float32 under HF Llama names, `has(name)`, `shape(name)`, `default_dtype` and
    `write_tokenizer(out_dir)`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return HFSource(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return GGUFSource(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    raise ValueError(f"{path}: not a model folder (config.json + *.safetensors) or a .gguf file")


BUNDLE_DOWN_FORMATS = ("split", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "same")
SPLIT_FORMATS = ("q4_0", "q4_1", "q8_0")  # down matrices whose columns can be split (BundleFormat::can_split)
SPLIT_SUFFIX = ":split"
SPLIT_GROUP = 32  # neurons sharing a row of scales: a block along d_ff
QUANT_DTYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")  # quantized by flashmem
ALL_DTYPES = DTYPES + (KEEP_FORMATS,) + QUANT_DTYPES
EMBED_FORMAT = "q8_0"  # embeddings and LM head of a quantized conversion (llama.cpp keeps these wider too)


def _threads() -> int:
    return len(os.sched_getaffinity(0))


class QuantizedSource:
    """A conversion source whose matrices are quantized to `fmt` by ggml's reference quantizers
    (csrc/kernels/quant/quantize.cpp, bit-exact with llama.cpp's without an importance matrix):
    it offers stored()/stored_spec() as a GGUF does, so the kept-formats writer serves both. The
    embeddings and LM head take q8_0; a matrix whose rows are not whole blocks of fmt (a 576-wide
    row in a 256-weight k-quant) takes q8_0, else f16; norms stay f32."""

    def __init__(self, source, fmt: str):
        self.source, self.fmt = source, fmt
        self.config, self.default_dtype = source.config, fmt
        self.path = getattr(source, "path", None)

    def has(self, name):
        return self.source.has(name)

    def tensor(self, name):
        return self.source.tensor(name)

    def write_tokenizer(self, out):
        self.source.write_tokenizer(out)

    def _format(self, name: str, shape: tuple) -> str:
        from .. import _core

        fmt = EMBED_FORMAT if name in ("model.embed_tokens.weight", "lm_head.weight") else self.fmt
        for f in (fmt, "q8_0"):
            if shape[-1] % _core.format_block(f)[0] == 0:
                return f
        return "f16"

    def stored_spec(self, name: str) -> tuple[str, tuple]:
        shape = self.source.shape(name)
        if len(shape) == 1:
            return "f32", shape
        fmt = self._format(name, shape)
        return fmt, (shape if fmt == "f16" else (shape[0], _core_row_bytes(fmt, shape[1])))

    def stored(self, name: str) -> tuple[str, np.ndarray]:
        from .. import _core

        w = np.ascontiguousarray(self.source.tensor(name), np.float32)
        if w.ndim == 1:
            return "f32", w
        if not np.isfinite(w).all():
            raise ValueError(f"tensor '{name}' contains NaN or inf")
        fmt = self._format(name, w.shape)
        return fmt, (w.astype(np.float16) if fmt == "f16" else _core.quantize(fmt, w, threads=_threads()))


def convert(src: str, out: str, dtype: str | None = None, align: int = 4096, progress: bool = True,
            bundle_down: str = "split") -> str:
    """Converts a HF folder or GGUF file to a flashmem folder at `out`; returns `out`. dtype: f32,
    f16 or bf16 (every matrix in it, the FFN as neuron bundles), or "gguf" (a GGUF file's own
    formats, block formats included, kept as they are; the FFN as its three matrices and as
    block-format bundles), or a block format (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k: every
    matrix quantized to it as llama.cpp's quantizer would, laid out as "gguf"). bundle_down: how the
    block-format bundles hold a down column: "split" (its own quants, the scales apart and resident;
    where the down matrix is q4_0, q4_1 or q8_0, else q8_0), or requantized along d_model to a
    format ("same": the down matrix's own format where it can hold a column of d_model weights)."""
    source = open_source(src)
    dtype = dtype or source.default_dtype
    if dtype not in ALL_DTYPES:
        raise ValueError(f"dtype must be one of {ALL_DTYPES}, got {dtype!r}")
    if dtype == KEEP_FORMATS and not isinstance(source, GGUFSource):
        raise ValueError(f"{src}: dtype {KEEP_FORMATS!r} keeps a GGUF file's formats; convert a HF folder with "
                         f"dtype f32, f16 or bf16")
    if bundle_down not in BUNDLE_DOWN_FORMATS:
        raise ValueError(f"bundle_down must be one of {BUNDLE_DOWN_FORMATS}, got {bundle_down!r}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    cfg = dict(source.config)
    dims = model_dims(cfg, src)
    for i in range(dims["n_layers"]):  # stops at the first layer missing: a config that claims 2^31
        name = layer_tensor_names(cfg, i)["wq"]  # layers costs what the source holds, not 2^31 names
        if not source.has(name):
            raise ValueError(f"{src}: the config has {dims['n_layers']} layers, the weights have no tensor '{name}'")

    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"output folder {out} exists and is not empty")
    _remove_abandoned(out)
    tmp = f"{out}.tmp-{os.getpid()}"  # written whole, then renamed to `out`: a killed convert leaves no `out`
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with tqdm(desc=f"convert {os.path.basename(src.rstrip('/'))} -> {dtype}", unit="tensor",
                  disable=not progress) as bar:
            if dtype in QUANT_DTYPES:
                source = QuantizedSource(source, dtype)
            if dtype == KEEP_FORMATS or dtype in QUANT_DTYPES:
                ffn = _write_keeping_formats(source, src, tmp, cfg, dims, bar)
                ffn.update(_write_format_bundles(source, src, tmp, cfg, dims, bundle_down, bar))
            else:
                ffn = _write_bundled(source, src, tmp, cfg, dims, dtype, align, bar)
        cfg["flashmem"] = {"format_version": FORMAT_VERSION, "dtype": dtype, "source": os.path.abspath(src),
                           "ffn": ffn}
        cfg.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        source.write_tokenizer(tmp)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:  # a failed write (a full disk) names no file
            raise OSError(e.errno, f"convert {src} -> {out}: {e.strerror} (writing into {tmp}, now removed)") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _remove_abandoned(out: str) -> None:
    """Removes the temporary folders of earlier converts to `out` whose process is gone (killed)."""
    folder, name = os.path.split(out)
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        pid = entry[len(name) + len(".tmp-"):]
        if entry.startswith(name + ".tmp-") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _resident_shapes(cfg: dict, dims: dict, with_ffn: bool) -> list[tuple[str, tuple]]:
    """(name, shape) of the tensors model.safetensors holds, in the order they are written."""
    d, ff = dims["d_model"], dims["d_ff"]
    q_dim, kv_dim = dims["n_heads"] * dims["head_dim"], dims["n_kv_heads"] * dims["head_dim"]
    shapes = {"attn_norm": (d,), "ffn_norm": (d,), "wq": (q_dim, d), "wk": (kv_dim, d), "wv": (kv_dim, d),
              "wo": (d, q_dim), "bq": (q_dim,), "bk": (kv_dim,), "bv": (kv_dim,), "q_norm": (dims["head_dim"],),
              "k_norm": (dims["head_dim"],), "attn_post_norm": (d,), "ffn_post_norm": (d,)}
    if with_ffn:
        shapes.update(gate=(ff, d), up=(ff, d), down=(d, ff))
    out = [("model.embed_tokens.weight", (dims["vocab_size"], d))]
    for i in range(dims["n_layers"]):
        out += [(name, shapes[kind]) for kind, name in layer_tensor_names(cfg, i).items() if kind in shapes]
    out.append(("model.norm.weight", (d,)))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (dims["vocab_size"], d)))
    return out


def _write_keeping_formats(source, src: str, tmp: str, cfg: dict, dims: dict, bar) -> dict:
    """model.safetensors with every tensor in the GGUF's own format: block formats as the bytes of
    each row (U8, (rows, row bytes)), named in the header's metadata "formats"; norms as f32."""
    from .. import _core

    names = _resident_shapes(cfg, dims, with_ffn=True)
    bar.total = 2 * len(names)
    specs, formats = [], {}
    for name, shape in names:  # the header first: formats and stored shapes, checked against the model's
        fmt, stored_shape = source.stored_spec(name)
        bar.update()
        if len(shape) == 1:
            specs.append((name, "f32", shape))
            continue
        block, block_bytes = _core.format_block(fmt)
        if block > 1 and shape[1] % block:
            raise ValueError(f"{src}: tensor '{name}' has rows of {shape[1]} weights, not a whole number of "
                             f"{fmt} blocks of {block}")
        stored = shape if block == 1 else (shape[0], shape[1] // block * block_bytes)
        if tuple(stored_shape) != stored:
            raise ValueError(f"{src}: tensor '{name}' has shape {tuple(stored_shape)} as stored, expected {stored} "
                             f"({fmt}, shape {shape})")
        specs.append((name, fmt if block == 1 else "u8", stored))
        formats[name] = fmt
    w = st.Writer(os.path.join(tmp, RESIDENT_FILE), specs, {"format": "pt", "formats": json.dumps(formats)})
    for name, tag, _ in specs:
        fmt, arr = source.stored(name)
        if tag == "f32" and fmt != "f32":  # a norm stored in f16 or bf16: the engine takes f32
            fmt, arr = "f32", source.tensor(name)
        if fmt in ("f32", "f16", "bf16") and not np.isfinite(st.to_f32(np.ascontiguousarray(arr), fmt)).all():
            raise ValueError(f"{src}: tensor '{name}' contains NaN or inf")
        w.write(name, np.ascontiguousarray(arr))
        bar.update()
    w.close()
    return {"layout": "matrices"}


def _write_format_bundles(source, src: str, tmp: str, cfg: dict, dims: dict, down_format: str, bar) -> dict:
    """ffn_bundles.safetensors for a GGUF kept in its formats: per layer (d_ff, bundle bytes) U8,
    gate and up rows as stored, down columns requantized along d_model (block formats) or cast to
    the gate's float type (float formats). Packed; the file is padded to whole 4096-byte blocks so
    that an aligned read of the last bundle stays inside it."""
    from .. import _core

    d, ff, L = dims["d_model"], dims["d_ff"], dims["n_layers"]
    names = [layer_tensor_names(cfg, i) for i in range(L)]
    gate_fmt, _ = source.stored_spec(names[0]["gate"])
    up_fmt, _ = source.stored_spec(names[0]["up"])
    down_fmt, _ = source.stored_spec(names[0]["down"])
    floats = ("f32", "f16", "bf16")
    for i in range(L):  # one bundle format for every layer
        for k, want in (("gate", gate_fmt), ("up", up_fmt)):
            got, _ = source.stored_spec(names[i][k])
            if got != want:
                raise ValueError(f"{src}: FFN {k} matrices differ in format across layers ({want}, {got} in layer "
                                 f"{i}); convert with dtype f16")
    if gate_fmt in floats or up_fmt in floats:
        if up_fmt != gate_fmt:
            raise ValueError(f"{src}: FFN gate ({gate_fmt}) and up ({up_fmt}) differ; convert with dtype f16")
        formats, split = [gate_fmt] * 3, False
    else:
        split = down_format == "split" and down_fmt in SPLIT_FORMATS and ff % SPLIT_GROUP == 0
        down = down_fmt if down_format in ("same", "split") else down_format
        if down in floats or d % _core.format_block(down)[0] or (down_format == "split" and not split):
            down = "q8_0"  # a float down matrix, d_model not whole blocks of its format, or no split
        if d % 32:
            raise ValueError(f"{src}: d_model {d} is not a multiple of 32, which block-format bundles need; "
                             "convert with dtype f16")
        for i in range(L if split else 0):
            got, _ = source.stored_spec(names[i]["down"])
            if got != down_fmt:
                raise ValueError(f"{src}: FFN down matrices differ in format across layers ({down_fmt}, {got} in "
                                 f"layer {i}); convert with bundle_down='q8_0'")
        formats = [gate_fmt, up_fmt, down + (SPLIT_SUFFIX if split else "")]
    piece = [_core_row_bytes(f, d) for f in formats[:2]] + [split_quant_bytes(formats[2], d)]
    nbytes = sum(piece)
    float_bundles = formats[0] in floats
    tag = formats[0] if float_bundles else "u8"
    cols = 3 * d if float_bundles else nbytes
    specs = [(f"model.layers.{i}.mlp.bundles", tag, (ff, cols)) for i in range(L)]
    if split:
        specs += [(f"model.layers.{i}.mlp.down_scales", "f16", (ff // SPLIT_GROUP, split_planes(down) * d))
                  for i in range(L)]
    path = os.path.join(tmp, BUNDLE_FILE)
    w = st.Writer(path, specs, {"layout": "gate_up_down", "d_model": d, "bundle_format": ",".join(formats)},
                  align=4096)
    split_scales = []  # (ff/32, planes * d) f16 per layer, written after the bundles
    bar.total += L
    for i in range(L):
        n = names[i]
        if float_bundles:
            b = np.empty((ff, 3 * d), np.float32)
            b[:, :d], b[:, d:2 * d], b[:, 2 * d:] = source.tensor(n["gate"]), source.tensor(n["up"]), \
                source.tensor(n["down"]).T
            if not np.isfinite(b).all():
                raise ValueError(f"{src}: FFN weights of layer {i} contain NaN or inf")
        elif split:
            (_, g), (_, u), (_, raw) = source.stored(n["gate"]), source.stored(n["up"]), source.stored(n["down"])
            quants, scales = split_down(raw, down, d, ff)
            if not np.isfinite(scales).all():
                raise ValueError(f"{src}: tensor '{n['down']}' has NaN or inf scales")
            split_scales.append(scales)
            b = np.concatenate([g.reshape(ff, -1), u.reshape(ff, -1), quants], axis=1)
        else:
            (_, g), (_, u) = source.stored(n["gate"]), source.stored(n["up"])
            fmt, raw = source.stored(n["down"])  # the down matrix the dense path uses, dequantized
            down = _core.dequantize(np.ascontiguousarray(raw).ravel(), fmt).reshape(d, ff) \
                if fmt not in floats else st.to_f32(np.asarray(raw), fmt)
            down_t = np.ascontiguousarray(down.T)  # (ff, d)
            if not np.isfinite(down_t).all():
                raise ValueError(f"{src}: tensor '{n['down']}' contains NaN or inf")
            qd = _core.quantize(formats[2], down_t, threads=_threads())
            b = np.concatenate([g.reshape(ff, -1), u.reshape(ff, -1), qd.reshape(ff, -1)], axis=1)
            if b.shape[1] != nbytes:
                raise ValueError(f"{src}: FFN bundles of layer {i} take {b.shape[1]} bytes, expected {nbytes}")
        w.write(specs[i][0], b)
        bar.update()
    for i, scales in enumerate(split_scales):
        w.write(f"model.layers.{i}.mlp.down_scales", scales)
    w.close()
    with open(path, "ab") as f:  # whole 4096-byte blocks
        f.write(b"\0" * (-f.tell() % 4096))
    return {"bundles": "gate_up_down", "file": BUNDLE_FILE, "bundle_format": formats, "bundle_bytes": nbytes}


def split_planes(fmt: str) -> int:
    """Rows of scales per group of a split down column: the scales, and q4_1's mins."""
    return 2 if fmt == "q4_1" else 1


def split_quant_bytes(piece: str, d: int) -> int:
    """Bytes of a bundle's down piece: a split column's quants, or a requantized column's blocks."""
    if not piece.endswith(SPLIT_SUFFIX):
        return _core_row_bytes(piece, d)
    return d if piece[:-len(SPLIT_SUFFIX)] == "q8_0" else d // 2


def split_down(raw: np.ndarray, fmt: str, d: int, ff: int) -> tuple[np.ndarray, np.ndarray]:
    """A down matrix (d, ff) in q4_0, q4_1 or q8_0, as stored (d rows of ff/32 blocks, U8), as
    split columns (csrc/ffn/bundled_ffn.h, BundleFormat): the quants of column j, (ff, d/2) U8
    (q8_0: (ff, d)), in chunks of 32 rows, element k of a chunk in byte k % 16, low nibble for
    k < 16; and the scales (ff/32, d) f16 (q4_1: then the mins, (ff/32, 2d)), row g for neurons
    32g .. 32g + 31. The weights are the stored ones, bit for bit."""
    head = {"q4_0": 2, "q4_1": 4, "q8_0": 2}[fmt]
    block_bytes = head + (32 if fmt == "q8_0" else 16)
    b = np.ascontiguousarray(raw).reshape(d, ff // 32, block_bytes)
    planes = [np.ascontiguousarray(b[:, :, k:k + 2]).view(np.float16)[:, :, 0].T for k in range(0, head, 2)]
    scales = np.ascontiguousarray(np.concatenate(planes, axis=1))  # (ff/32, planes * d)
    if fmt == "q8_0":
        return np.ascontiguousarray(b[:, :, head:].reshape(d, ff).T), scales
    qs = b[:, :, head:]
    cols = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(d, ff).T  # (ff, d): column j's quants
    c = cols.reshape(ff, d // 32, 2, 16)
    return np.ascontiguousarray((c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(ff, d // 2)), scales


def _core_row_bytes(fmt: str, n: int) -> int:
    from .. import _core

    block, block_bytes = _core.format_block(fmt)
    if n % block:
        raise ValueError(f"a row of {n} weights is not a whole number of {fmt} blocks of {block}")
    return n // block * block_bytes


def _write_bundled(source, src: str, tmp: str, cfg: dict, dims: dict, dtype: str, align: int, bar) -> dict:
    """model.safetensors (every tensor but the FFN, matrices in dtype) and ffn_bundles.safetensors."""
    d, ff, L = dims["d_model"], dims["d_ff"], dims["n_layers"]
    resident = [(name, dtype if len(shape) == 2 else "f32", shape)
                for name, shape in _resident_shapes(cfg, dims, with_ffn=False)]
    stride = bundle_stride(d, dtype, align)
    bundles = [(f"model.layers.{i}.mlp.bundles", dtype, (ff, stride)) for i in range(L)]
    rw = st.Writer(os.path.join(tmp, RESIDENT_FILE), resident, {"format": "pt"})
    bw = st.Writer(os.path.join(tmp, BUNDLE_FILE), bundles,
                   {"layout": "gate_up_down", "d_model": d, "align": align}, align=align)
    bar.total = len(resident) + L

    def put(name, shape):
        w = source.tensor(name)
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{src}: tensor '{name}' has shape {tuple(w.shape)}, expected {tuple(shape)}")
        if not np.isfinite(w).all():
            raise ValueError(f"{src}: tensor '{name}' contains NaN or inf")
        rw.write(name, w)
        bar.update()

    layer_of = {n: int(n.split(".")[2]) for n, _, _ in resident if n.startswith("model.layers.")}
    done_layers = set()
    for name, _, shape in resident:
        i = layer_of.get(name)
        if i is not None and i not in done_layers:  # bundles of layer i, written as layer i starts
            names = layer_tensor_names(cfg, i)
            gate, up, down = (source.tensor(names[k]) for k in ("gate", "up", "down"))
            for k, w, want in (("gate", gate, (ff, d)), ("up", up, (ff, d)), ("down", down, (d, ff))):
                if tuple(w.shape) != want:
                    raise ValueError(f"{src}: tensor '{names[k]}' has shape {tuple(w.shape)}, expected {want}")
            b = np.zeros((ff, stride), np.float32)
            b[:, :d], b[:, d:2 * d], b[:, 2 * d:3 * d] = gate, up, down.T
            if not np.isfinite(b).all():
                raise ValueError(f"{src}: FFN weights of layer {i} contain NaN or inf")
            bw.write(bundles[i][0], b)
            bar.update()
            done_layers.add(i)
        put(name, shape)
    rw.close()
    bw.close()
    return {"file": BUNDLE_FILE, "layout": "gate_up_down", "align": align, "stride": stride}
