"""HF transformers model folders as a conversion source: config.json, model.safetensors or sharded
*.safetensors with their index, tokenizer files. Tensors come out as float32 numpy arrays under
the engine's names (HF Llama's: model.layers.{i}.self_attn.q_proj.weight, ...), as from every
source (convert.py). Gemma 3 (model_type gemma3_text): its norms' weights w come out as the
multiplier 1 + w that HF's Gemma RMSNorm applies (the engine multiplies by the weight, and
llama.cpp's GGUF files store 1 + w too).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from . import safetensors_io as st
from .config import GEMMA_TYPES, read_config, read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2") + GEMMA_TYPES


def layer_tensor_names(cfg: dict, i: int) -> dict[str, str]:
    """The tensors of layer i, by role, under the engine's names (csrc/model/decoder.cpp's table:
    HF Llama's, plus Gemma's q/k norms and output norms)."""
    from .. import _core

    kinds = {"attn_norm": "attn_norm", "wq": "wq", "wk": "wk", "wv": "wv", "wo": "wo", "ffn_norm": "ffn_norm",
             "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
    if cfg.get("attention_bias", False) or cfg.get("model_type") == "qwen2":
        kinds.update(bq="bq", bk="bk", bv="bv")
    if cfg.get("model_type") in GEMMA_TYPES:
        kinds.update(q_norm="q_norm", k_norm="k_norm", attn_post_norm="attn_post_norm", ffn_post_norm="ffn_post_norm")
    return {role: _core.tensor_name(kind, i) for role, kind in kinds.items()}


def gemma_name(name: str) -> str:
    """The HF Gemma 3 name of an engine tensor name: Gemma's "post_attention_layernorm" is the norm
    on the attention output (the engine's "self_attn.post_norm"), its FFN input norm is
    "pre_feedforward_layernorm" (Llama's "post_attention_layernorm")."""
    if name.endswith(".post_attention_layernorm.weight"):
        return name.replace(".post_attention_layernorm.", ".pre_feedforward_layernorm.")
    if name.endswith(".self_attn.post_norm.weight"):
        return name.replace(".self_attn.post_norm.", ".post_attention_layernorm.")
    return name


class HFSource:
    """A HF transformers folder: config.json, model.safetensors or sharded *.safetensors + index."""

    def __init__(self, folder: str):
        self.path = folder
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{folder}: no config.json (not a HF model folder)")
        self.config = read_config(cfg_path)
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

    def _source_name(self, name: str) -> str:
        return gemma_name(name) if self.config.get("model_type") in GEMMA_TYPES else name

    def has(self, name: str) -> bool:
        return self._source_name(name) in self._where

    def shape(self, name: str) -> tuple:
        src = self._source_name(name)
        if src not in self._where:
            raise ValueError(f"{self.path}: tensor '{src}' is missing")
        return tuple(self._where[src][1].shape)

    def tensor(self, name: str) -> np.ndarray:
        src = self._source_name(name)
        if src not in self._where:
            raise ValueError(f"{self.path}: tensor '{src}' is missing")
        p, info = self._where[src]
        if info.tag not in ("f32", "f16", "bf16"):
            raise ValueError(f"{p}: tensor '{src}' has dtype {info.dtype}; expected F32, F16 or BF16")
        w = st.to_f32(st.load_tensor(p, info), info.tag)
        if self.config.get("model_type") in GEMMA_TYPES and name.endswith("norm.weight"):
            w = (w + np.float32(1.0)).astype(np.float32)  # Gemma's RMSNorm multiplies by 1 + w
        return w

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
