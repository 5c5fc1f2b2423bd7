"""GGUF files (llama.cpp's format) as a conversion source: general.architecture = llama, tensors
dequantized to float32 with the `gguf` package one at a time, under HF Llama names (Q/K rows
un-permuted), and the tokenizer rebuilt from the file's metadata."""
from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_GGUF_LAYER = {
    "attn_norm": "input_layernorm.weight", "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight", "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm": "post_attention_layernorm.weight", "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight",
}
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freqs"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) >= 3:
        key = ".".join(parts[2:])
        key = key[: -len(".weight")] if key.endswith(".weight") else key
        if key in _GGUF_LAYER:
            return f"model.layers.{parts[1]}.{_GGUF_LAYER[key]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's convert-time row permutation of Q/K (interleaved -> HF rotate_half)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFSource:
    """A GGUF file with general.architecture = llama: tensors dequantized to f32 one at a time
    (tensor), or as the file stores them (stored: conversion with dtype "gguf" keeps them so)."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # the gguf package raises a variety of errors on bad files
            raise ValueError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from None
        arch = self._field("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: 'llama')")
        self._tensors = {}
        for t in self._reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise ValueError(f"{path}: unexpected tensor '{t.name}' for a llama model")
            if t.tensor_type.name not in GGUF_TYPES:
                raise ValueError(f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, "
                                 f"not supported (supported: {', '.join(GGUF_TYPES)})")
            self._tensors[name] = t
        a = "llama."
        n_embd = self._req(a + "embedding_length")
        n_head = self._req(a + "attention.head_count")
        vocab = self._field(a + "vocab_size") or len(self._field("tokenizer.ggml.tokens") or [])
        self.config = {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": int(vocab), "hidden_size": n_embd,
            "intermediate_size": self._req(a + "feed_forward_length"),
            "num_hidden_layers": self._req(a + "block_count"),
            "num_attention_heads": n_head,
            "num_key_value_heads": self._field(a + "attention.head_count_kv") or n_head,
            "head_dim": self._field(a + "rope.dimension_count") or n_embd // n_head,
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
        self.default_dtype = "gguf"  # the file's own formats, as llama.cpp uses them

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
        w = w.reshape(want)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, self.config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, self.config["num_key_value_heads"])
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
        data = data.reshape(shape)
        if name.endswith("q_proj.weight"):
            data = unpermute_qk(data, self.config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            data = unpermute_qk(data, self.config["num_key_value_heads"])
        return fmt, data

    def write_tokenizer(self, out: str) -> None:
        fields = {k: self._field(k) for k in self._reader.fields if k.startswith("tokenizer.")}
        tok, tok_config = tokenizer_from_gguf(fields, self.path)
        tok.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(tok_config, f, indent=1)


# --- tokenizer ------------------------------------------------------------------------------

# GGUF token types (llama.cpp): 3 = control, 4 = user-defined
_CONTROL, _USER_DEFINED = 3, 4


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(fields: dict, path: str) -> tuple[HFTokenizer, dict]:
    """Builds the tokenizer a GGUF file describes, giving the same ids as HF transformers'
    GGUF loader. Byte-level BPE ("gpt2": SmolLM2, Llama 3, Qwen2) is built here; SentencePiece
    vocabularies ("llama": Llama 2, Mistral) go through transformers' converter when installed."""
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: GGUF has no tokenizer.ggml.tokens")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "gpt2":
        merges = fields.get("tokenizer.ggml.merges")
        if not merges:
            raise ValueError(f"{path}: GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {}
        for i, t in enumerate(tokens):
            vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))] = i
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        tok.add_special_tokens(special)
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
    elif model == "llama":
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
        except ImportError:
            raise ValueError(f"{path}: SentencePiece GGUF vocabularies need `transformers` installed to convert; "
                             "or convert the HF folder instead") from None
        td = {"tokenizer_type": "llama", "tokens": tokens, "token_type": types,
              "scores": fields.get("tokenizer.ggml.scores"), "merges": fields.get("tokenizer.ggml.merges")}
        td = {k: v for k, v in td.items() if v is not None}
        tok, _ = convert_gguf_tokenizer("llama", td)
    else:
        raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')")

    def tok_str(key):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama"))
    bos = tok_str("bos")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    config = {"bos_token": bos, "eos_token": tok_str("eos"), "unk_token": tok_str("unknown"),
              "pad_token": tok_str("padding"), "add_bos_token": add_bos,
              "chat_template": fields.get("tokenizer.chat_template")}
    return tok, {k: v for k, v in config.items() if v is not None}
