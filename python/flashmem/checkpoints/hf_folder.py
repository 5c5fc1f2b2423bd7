"""HF transformers model folders as a conversion source: config.json, model.safetensors or sharded
*.safetensors with their index, tokenizer files. Tensors come out as float32 numpy arrays under
HF Llama names (model.layers.{i}.self_attn.q_proj.weight, ...), as from every source (convert.py).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from . import safetensors_io as st
from .config import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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

    def shape(self, name: str) -> tuple:
        if name not in self._where:
            raise ValueError(f"{self.path}: tensor '{name}' is missing")
        return tuple(self._where[name][1].shape)

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
