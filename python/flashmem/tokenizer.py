"""Tokenizer (the `tokenizers` library) and chat templates (jinja2, as HF renders them)."""
from __future__ import annotations

import json
import os
from functools import lru_cache

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

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


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    """Text <-> ids, plus the model's chat template."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
        cfg = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            from .sources import read_json

            cfg = read_json(cfg_path)
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain text prompt")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


@lru_cache(maxsize=8)
def _compile(template: str):
    """Compiles a chat template the way HF transformers does (sandboxed jinja2)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
