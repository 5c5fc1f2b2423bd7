"""Model sources that `flashmem convert` reads: HF-format folders and GGUF files.

Both present the same interface: an HF-style `config` dict, `tensor(name)` returning float32
numpy arrays under HF Llama names (model.layers.{i}.self_attn.q_proj.weight, ...), and
`write_tokenizer(out_dir)` writing tokenizer.json + tokenizer_config.json.
"""
from __future__ import annotations

import json
import os
import shutil
import numpy as np

from . import safetensors_io as st

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def read_json(path: str):
    """Loads a JSON file; malformed JSON raises ValueError naming the file."""
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None


def open_source(path: str):
    path = os.fspath(path)
    if os.path.isdir(path):
        return HFSource(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return GGUFSource(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    raise ValueError(f"{path}: not a model folder (config.json + *.safetensors) or a .gguf file")


def layer_tensor_names(cfg: dict, i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    names = {
        "attn_norm": p + "input_layernorm.weight",
        "wq": p + "self_attn.q_proj.weight",
        "wk": p + "self_attn.k_proj.weight",
        "wv": p + "self_attn.v_proj.weight",
        "wo": p + "self_attn.o_proj.weight",
        "ffn_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }
    if cfg.get("attention_bias", False) or cfg.get("model_type") == "qwen2":
        names.update(bq=p + "self_attn.q_proj.bias", bk=p + "self_attn.k_proj.bias", bv=p + "self_attn.v_proj.bias")
    return names


class HFSource:
    """A HF transformers folder: config.json, model.safetensors or sharded *.safetensors + index."""

    def __init__(self, folder: str):
        self.path = folder
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{folder}: no config.json (not a HF model folder)")
        self.config = read_json(cfg_path)
        mt = self.config.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{cfg_path}: model_type {mt!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            files = sorted(set(read_json(index_path)["weight_map"].values()))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors weights")
        self._where = {}
        for fn in files:
            p = os.path.join(folder, fn)
            infos, _ = st.read_header(p)
            for name, info in infos.items():
                self._where[name] = (p, info)
        self.config.setdefault("tie_word_embeddings", "lm_head.weight" not in self._where)
        torch_dtype = str(self.config.get("torch_dtype") or self.config.get("dtype") or "float32")
        self.default_dtype = {"bfloat16": "bf16", "float16": "f16"}.get(torch_dtype, "f32")

    def has(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ValueError(f"{self.path}: tensor '{name}' is missing")
        p, info = self._where[name]
        if info.tag not in ("f32", "f16", "bf16"):
            raise ValueError(f"{p}: tensor '{name}' has dtype {info.dtype}; expected F32, F16 or BF16")
        return st.to_f32(st.load_tensor(p, info), info.tag)

    def write_tokenizer(self, out: str) -> None:
        src = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{self.path}: no tokenizer.json")
        shutil.copy(src, out)
        tc = {}
        if os.path.isfile(os.path.join(self.path, "tokenizer_config.json")):
            tc = read_json(os.path.join(self.path, "tokenizer_config.json"))
        jinja = os.path.join(self.path, "chat_template.jinja")
        if "chat_template" not in tc and os.path.isfile(jinja):
            with open(jinja) as f:
                tc["chat_template"] = f.read()
        gen = os.path.join(self.path, "generation_config.json")
        if os.path.isfile(gen):
            shutil.copy(gen, out)
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(tc, f, indent=1)


# --- GGUF -----------------------------------------------------------------------------------

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
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
    """A GGUF file with general.architecture = llama, dequantized to f32 one tensor at a time."""

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
        self.default_dtype = "f16"

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

    def write_tokenizer(self, out: str) -> None:
        from .tokenizer import tokenizer_from_gguf

        fields = {k: self._field(k) for k in self._reader.fields if k.startswith("tokenizer.")}
        tok, tok_config = tokenizer_from_gguf(fields, self.path)
        tok.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(tok_config, f, indent=1)
