"""Tokenizer (the `tokenizers` library) and chat templates (jinja2, as HF renders them)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from functools import lru_cache

from tokenizers import Tokenizer as HFTokenizer

from .checkpoints.config import read_json


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


@contextmanager
def _tokenizer_errors(path: str):
    """The errors of the `tokenizers` library on a malformed tokenizer.json as ValueError naming
    the file: it raises a bare Exception (a WordLevel model without its unknown token, when
    encoding), or panics (Rust; its PanicException is a BaseException, not an Exception)."""
    try:
        yield
    except BaseException as e:
        if type(e) is not Exception and type(e).__name__ != "PanicException":
            raise
        raise ValueError(f"{path}: the tokenizer failed ({e})") from None


def _check_tokenizer_config(cfg, path: str) -> None:
    """Raises ValueError naming the field unless the tokenizer_config.json fields read here have
    their types: special tokens a string or {"content": string}, the chat template a string or a
    list of {"name", "template"} strings, flashmem_stop_tokens a list of strings."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    for key in ("bos_token", "eos_token"):
        v = cfg.get(key)
        if v is not None and not isinstance(_token_text(v), str):
            raise ValueError(f"{path}: field '{key}' must be a string or {{\"content\": string}}, got {v!r:.80}")
    template = cfg.get("chat_template")
    if not (template is None or isinstance(template, str) or isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template)):
        raise ValueError(f"{path}: field 'chat_template' must be a string or a list of "
                         f"{{\"name\", \"template\"}} strings, got {template!r:.80}")
    stops = cfg.get("flashmem_stop_tokens")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(t, str) for t in stops)):
        raise ValueError(f"{path}: field 'flashmem_stop_tokens' must be a list of strings, got {stops!r:.80}")


class Tokenizer:
    """Text <-> ids, plus the model's chat template."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        self.path = path
        with _tokenizer_errors(path):  # a panic
            try:
                self._tok = HFTokenizer.from_file(path)
            except Exception as e:
                raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
        cfg = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            cfg = read_json(cfg_path)
            _check_tokenizer_config(cfg, cfg_path)
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        # tokens that end a turn besides EOS (Gemma's <end_of_turn>), written by the GGUF reader
        stops = [self._tok.token_to_id(t) for t in cfg.get("flashmem_stop_tokens") or []]
        self.stop_token_ids = [i for i in stops if i is not None]
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        with _tokenizer_errors(self.path):
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        with _tokenizer_errors(self.path):
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
