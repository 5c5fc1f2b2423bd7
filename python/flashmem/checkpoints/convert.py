"""`flashmem convert`: HF folder or GGUF -> the engine's own folder.

Layout of the output folder (FORMAT_VERSION 1):
  config.json               HF config + a "flashmem" section (format version, dtype, FFN layout)
  tokenizer.json, tokenizer_config.json (+ generation_config.json when the source has one)
  model.safetensors         resident weights under HF names: embeddings, norms, attention, lm_head
  ffn_bundles.safetensors   per layer l, tensor "model.layers.{l}.mlp.bundles" of shape
                            (d_ff, stride): row i = [gate row i | up row i | down column i | zero pad],
                            stride * itemsize a multiple of `align` (4096), data section aligned too,
                            so every bundle starts at a 4096-byte file offset (one direct-I/O read
                            fetches one neuron)
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

FORMAT_VERSION = 1
DTYPES = ("f32", "f16", "bf16")
BUNDLE_FILE = "ffn_bundles.safetensors"
RESIDENT_FILE = "model.safetensors"


def bundle_stride(d_model: int, dtype: str, align: int) -> int:
    """Elements per bundle row: 3*d_model rounded up so a row is a multiple of `align` bytes."""
    esz = 4 if dtype == "f32" else 2
    nbytes = -(-3 * d_model * esz // align) * align
    return nbytes // esz


def open_source(path: str):
    """The conversion source at `path`: a HF folder or a .gguf file. Both give an HF-style
    `config`, `tensor(name)` as float32 under HF Llama names, `has(name)`, `default_dtype` and
    `write_tokenizer(out_dir)`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return HFSource(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return GGUFSource(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    raise ValueError(f"{path}: not a model folder (config.json + *.safetensors) or a .gguf file")


def convert(src: str, out: str, dtype: str | None = None, align: int = 4096, progress: bool = True) -> str:
    """Converts a HF folder or GGUF file to a flashmem folder at `out`; returns `out`."""
    source = open_source(src)
    dtype = dtype or source.default_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    cfg = dict(source.config)
    dims = model_dims(cfg, src)
    d, ff, L = dims["d_model"], dims["d_ff"], dims["n_layers"]
    q_dim, kv_dim = dims["n_heads"] * dims["head_dim"], dims["n_kv_heads"] * dims["head_dim"]
    tied = bool(cfg.get("tie_word_embeddings", False))

    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"output folder {out} exists and is not empty")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        # Resident tensors in the order they are written.
        shapes = {"attn_norm": (d,), "ffn_norm": (d,), "wq": (q_dim, d), "wk": (kv_dim, d), "wv": (kv_dim, d),
                  "wo": (d, q_dim), "bq": (q_dim,), "bk": (kv_dim,), "bv": (kv_dim,)}
        resident = [("model.embed_tokens.weight", dtype, (dims["vocab_size"], d))]
        for i in range(L):
            for kind, name in layer_tensor_names(cfg, i).items():
                if kind in shapes:
                    resident.append((name, dtype if len(shapes[kind]) == 2 else "f32", shapes[kind]))
        resident.append(("model.norm.weight", "f32", (d,)))
        if not tied:
            resident.append(("lm_head.weight", dtype, (dims["vocab_size"], d)))
        stride = bundle_stride(d, dtype, align)
        bundles = [(f"model.layers.{i}.mlp.bundles", dtype, (ff, stride)) for i in range(L)]

        rw = st.Writer(os.path.join(tmp, RESIDENT_FILE), resident, {"format": "pt"})
        bw = st.Writer(os.path.join(tmp, BUNDLE_FILE), bundles,
                       {"layout": "gate_up_down", "d_model": d, "align": align}, align=align)
        bar = tqdm(total=len(resident) + L, desc=f"convert {os.path.basename(src.rstrip('/'))} -> {dtype}",
                   unit="tensor", disable=not progress)

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
        bar.close()

        cfg["flashmem"] = {"format_version": FORMAT_VERSION, "dtype": dtype, "source": os.path.abspath(src),
                           "ffn": {"file": BUNDLE_FILE, "layout": "gate_up_down", "align": align, "stride": stride}}
        cfg.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        source.write_tokenizer(tmp)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
