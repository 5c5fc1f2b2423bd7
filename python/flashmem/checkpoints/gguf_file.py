"""GGUF files (llama.cpp's format) as a conversion source: general.architecture llama or gemma3,
tensors dequantized to float32 with the `gguf` package one at a time, under the engine's names
(HF Llama's; a llama file's Q/K rows un-permuted), the config as HF writes it (Gemma 3: its
Gemma3TextConfig), and the tokenizer rebuilt from the file's metadata."""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from .config import check_config
from .gguf_tokenizer import bytes_to_unicode, save_compact, tokenizer_from_gguf  # noqa: F401  (bytes_to_unicode: re-exported)

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_GGUF_LAYER = {
    "attn_norm": "input_layernorm.weight", "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight", "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm": "post_attention_layernorm.weight", "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight",
}
# Gemma 3's extra tensors (its norms are stored as the multiplier 1 + w, which the engine takes)
_GGUF_GEMMA3_LAYER = {
    "attn_q_norm": "self_attn.q_norm.weight", "attn_k_norm": "self_attn.k_norm.weight",
    "post_attention_norm": "self_attn.post_norm.weight", "post_ffw_norm": "post_feedforward_layernorm.weight",
}
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
# Gemma 3 settings its GGUF files do not carry (llama.cpp and HF's Gemma3TextConfig use the same):
# every sixth layer attends to all positions, the others to a window with rope base 10000
GEMMA3_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freqs"}


def _hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) >= 3:
        key = ".".join(parts[2:])
        key = key[: -len(".weight")] if key.endswith(".weight") else key
        table = {**_GGUF_LAYER, **_GGUF_GEMMA3_LAYER} if arch == "gemma3" else _GGUF_LAYER
        if key in table:
            return f"model.layers.{parts[1]}.{table[key]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's convert-time row permutation of Q/K (interleaved -> HF rotate_half)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
_STRING, _ARRAY = 8, 9


def check_header(path: str) -> None:
    """Walks a GGUF file's header (metadata, tensor infos) checking each count and length against
    the bytes left in the file, before the gguf package reads it: its reader trusts an array's
    count, and reads an array of 2^60 values that runs past the end of the file value by value
    (empty ones), for ever. Files of a version or byte order this does not know are left to it."""
    size = os.path.getsize(path)
    if size < 24:
        return  # the reader says what is wrong
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        version = struct.unpack_from("<I", m, 4)[0]
        order = "<" if version in (2, 3) else ">" if version in (2 << 24, 3 << 24) else None
        if m[:4] != b"GGUF" or order is None:
            return
        pos = 8

        def take(fmt: str) -> int:
            nonlocal pos
            fmt = order + fmt
            need(struct.calcsize(fmt), "a number")
            v = struct.unpack_from(fmt, m, pos)[0]
            pos += struct.calcsize(fmt)
            return v

        def need(n: int, what: str) -> None:
            if n > size - pos:
                raise ValueError(f"{path}: {what} at byte {pos} needs {n} bytes, the file has {size - pos} left")

        def skip(n: int, what: str) -> None:
            nonlocal pos
            need(n, what)
            pos += n

        def value(vtype: int, depth: int = 0) -> None:
            if vtype in _SCALAR_BYTES:
                skip(_SCALAR_BYTES[vtype], "a value")
            elif vtype == _STRING:
                skip(take("Q"), "a string")
            elif vtype == _ARRAY and depth < 2:
                item, n = take("I"), take("Q")
                least = _SCALAR_BYTES.get(item) or {_STRING: 8, _ARRAY: 12}.get(item)
                if least is None:
                    raise ValueError(f"{path}: array of unknown value type {item} at byte {pos}")
                need(n * least, f"an array of {n} values")
                if item in _SCALAR_BYTES:
                    skip(n * least, "an array")
                else:
                    for _ in range(n):
                        value(item, depth + 1)
            else:
                raise ValueError(f"{path}: unknown (or too deeply nested) metadata value type {vtype} at byte {pos}")

        n_tensors, n_kv = take("Q"), take("Q")
        need(n_kv * 13, f"{n_kv} metadata entries")  # key length, one byte of key, type (at least)
        for _ in range(n_kv):
            skip(take("Q"), "a metadata key")
            value(take("I"))
        need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length, dim count, type, offset
        for _ in range(n_tensors):
            skip(take("Q"), "a tensor name")
            n_dims = take("I")
            skip(8 * n_dims, f"{n_dims} dims")
            skip(12, "a tensor's type and offset")


class GGUFSource:
    """A GGUF file with general.architecture llama or gemma3: tensors dequantized to f32 one at a
    time (tensor), or as the file stores them (stored: conversion with dtype "gguf" keeps them so)."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        check_header(path)
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # the gguf package raises a variety of errors on bad files
            raise ValueError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from None
        arch = self._field("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                             f"{', '.join(map(repr, SUPPORTED_ARCHITECTURES))})")
        self.architecture = arch
        self._tensors = {}
        for t in self._reader.tensors:
            name = _hf_name(t.name, arch)
            if name is None:
                raise ValueError(f"{path}: unexpected tensor '{t.name}' for a {arch} model")
            if t.tensor_type.name not in GGUF_TYPES:
                raise ValueError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, "
                                 f"not supported (supported: {', '.join(GGUF_TYPES)})")
            self._tensors[name] = t
        a = arch + "."
        n_layers = self._req(a + "block_count")
        layers = {t.name.split(".")[1] for t in self._reader.tensors if t.name.startswith("blk.")}
        if n_layers > len(layers):  # before anything per layer is built
            raise ValueError(f"{path}: metadata field '{a}block_count' is {n_layers}, the file holds tensors of "
                             f"{len(layers)} layers")
        n_embd = self._req(a + "embedding_length")
        n_head = self._req(a + "attention.head_count")
        vocab = self._field(a + "vocab_size") or len(self._field("tokenizer.ggml.tokens") or [])
        self.config = {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": int(vocab), "hidden_size": n_embd,
            "intermediate_size": self._req(a + "feed_forward_length"),
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_head,
            "num_key_value_heads": self._field(a + "attention.head_count_kv") or n_head,
            "head_dim": self._field(a + "attention.key_length") or self._field(a + "rope.dimension_count") or
            (n_embd // n_head if n_head > 0 else None),
            "max_position_embeddings": self._field(a + "context_length") or 2048,
            "rms_norm_eps": float(self._field(a + "attention.layer_norm_rms_epsilon") or 1e-5),
            "rope_theta": float(self._field(a + "rope.freq_base") or 10000.0),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
        }
        if self._field(a + "rope.scaling.type") == "linear":
            self.config["rope_scaling"] = {"rope_type": "linear", "factor": float(self._field(a + "rope.scaling.factor"))}
        if "rope_freqs" in self._tensors:  # llama-3 style per-frequency factors
            self.config["flashmem_rope_freq_factors"] = self.tensor("rope_freqs").ravel().tolist()
        if arch == "gemma3":
            self._gemma3_config(a)
        check_config(self.config, f"{path}: metadata")
        self.default_dtype = "gguf"  # the file's own formats, as llama.cpp uses them

    def _gemma3_config(self, a: str) -> None:
        """The config HF's Gemma3TextConfig would hold: GeGLU, q/k and output norms (implied by the
        model type), sliding windows on all but every sixth layer with their own rope base."""
        c = self.config
        n_layers, window = c["num_hidden_layers"], self._field(a + "attention.sliding_window")
        pattern = self._field(a + "attention.sliding_window_pattern") or GEMMA3_WINDOW_PATTERN
        if isinstance(pattern, list):  # per layer: True where the layer has a window
            if len(pattern) != n_layers:
                raise ValueError(f"{self.path}: metadata field '{a}attention.sliding_window_pattern' has "
                                 f"{len(pattern)} entries for {n_layers} layers")
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
        full = {"rope_type": "default", "rope_theta": c.pop("rope_theta")}
        if "rope_scaling" in c:
            full.update(c.pop("rope_scaling"))
        local_base = float(self._field(a + "rope.freq_base_swa") or GEMMA3_LOCAL_ROPE_BASE)
        c.update({
            "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": c["head_dim"],
            "sliding_window": int(window) if window else None,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": local_base}},
            "final_logit_softcapping": self._field(a + "final_logit_softcapping"),
            "attn_logit_softcapping": self._field(a + "attn_logit_softcapping"),
        })
        if not window:
            c.pop("layer_types")

    def _field(self, key):
        f = self._reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:
            raise ValueError(f"{self.path}: metadata field '{key}' is malformed") from None

    def _req(self, key):
        v = self._field(key)
        if v is None:
            raise ValueError(f"{self.path}: metadata field '{key}' is missing")
        return int(v)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple:
        if name not in self._tensors:
            raise ValueError(f"{self.path}: tensor '{name}' is missing")
        return tuple(int(s) for s in reversed(self._tensors[name].shape))

    def tensor(self, name: str) -> np.ndarray:
        import gguf

        if name not in self._tensors:
            raise ValueError(f"{self.path}: tensor '{name}' is missing")
        t = self._tensors[name]
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise ValueError(f"{self.path}: cannot dequantize tensor '{t.name}' ({e})") from None
        want = tuple(int(s) for s in reversed(t.shape))
        if w.size != int(np.prod(want)):
            raise ValueError(f"{self.path}: tensor '{t.name}' holds {w.size} values, its shape says {want}")
        return self._unpermute(name, w.reshape(want))

    def _unpermute(self, name: str, w: np.ndarray) -> np.ndarray:
        """llama files: Q/K rows back to HF's order (Gemma files keep HF's: llama.cpp ropes them as NeoX)."""
        if self.architecture != "llama":
            return w
        if name.endswith("q_proj.weight"):
            return unpermute_qk(w, self.config["num_attention_heads"])
        if name.endswith("k_proj.weight"):
            return unpermute_qk(w, self.config["num_key_value_heads"])
        return w

    def stored_spec(self, name: str) -> tuple[str, tuple]:
        """(format, shape) of stored(name) without reading the data."""
        if name not in self._tensors:
            raise ValueError(f"{self.path}: tensor '{name}' is missing")
        import gguf

        t = self._tensors[name]
        fmt = t.tensor_type.name.lower()
        shape = tuple(int(s) for s in reversed(t.shape))
        if fmt in ("f32", "f16", "bf16"):
            return fmt, shape
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        rows = shape[0] if len(shape) == 2 else 1
        return fmt, (rows, shape[-1] // block * block_bytes)

    def stored(self, name: str) -> tuple[str, np.ndarray]:
        """(format, array) of a tensor as the file stores it, Q/K rows un-permuted: float formats
        ("f32", "f16", "bf16") as arrays of the tensor's shape (bf16 as uint16 bit patterns), block
        formats ("q4_1", "q6_k", ...) as the bytes of each row, (rows, row bytes) uint8."""
        fmt, shape = self.stored_spec(name)
        t = self._tensors[name]
        data = np.asarray(t.data)
        if fmt == "bf16":
            data = data.view(np.uint16)
        want = int(np.prod(shape)) * {"f32": 4, "f16": 2, "bf16": 2}.get(fmt, 1)
        if data.nbytes != want or int(t.n_bytes) != want:
            raise ValueError(f"{self.path}: tensor '{t.name}' holds {data.nbytes} bytes, its shape and type "
                             f"{t.tensor_type.name} need {want}")
        return fmt, self._unpermute(name, data.reshape(shape))

    def write_tokenizer(self, out: str) -> None:
        fields = {k: self._field(k) for k in self._reader.fields if k.startswith("tokenizer.")}
        tok, tok_config = tokenizer_from_gguf(fields, self.path, self._field("general.architecture"))
        save_compact(tok, os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(tok_config, f, indent=1)
