"""Memory encoders from the model itself: a key for a MemoryBank, and a memory's value embeddings.
They take what they need from the model (its tokenizer and embedding lookup), not the model."""
from __future__ import annotations

from typing import Callable

import numpy as np


class KeyEncoder:
    """A unit-norm key (d_model,) of a text. pooling="embedding" (default): the mean of the text's
    token embeddings minus the mean row of the embedding table (the direction all tokens share);
    it runs no layer, so it leaves the KV cache (and its prefix reuse) untouched. "hidden": the
    mean of the final hidden states (runs the model)."""

    def __init__(self, tokenizer, embed: Callable, hidden_states: Callable, vocab_size: int, d_model: int):
        self.tokenizer, self.embed, self.hidden_states = tokenizer, embed, hidden_states
        self.vocab_size, self.d_model = vocab_size, d_model
        self._embed_mean = None  # mean row of the embedding table, computed on first use

    def __call__(self, text: str, pooling: str = "embedding") -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"embed_key: text must be a string, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError("embed_key: text is empty")
        if pooling == "embedding":
            v = self.embed(np.asarray(ids, np.int32)).mean(0) - self.embedding_mean()
        elif pooling == "hidden":
            v = self.hidden_states(ids).mean(0)
        else:
            raise ValueError(f"pooling must be 'embedding' or 'hidden', got {pooling!r}")
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)

    def embedding_mean(self) -> np.ndarray:
        if self._embed_mean is None:
            total = np.zeros(self.d_model, np.float64)
            for s in range(0, self.vocab_size, 4096):
                total += self.embed(np.arange(s, min(s + 4096, self.vocab_size), dtype=np.int32)).sum(0)
            self._embed_mean = (total / self.vocab_size).astype(np.float32)
        return self._embed_mean


def memory_value(tokenizer, embed: Callable, text: str, slots: int | None = None) -> np.ndarray:
    """Value embeddings (n, d_model) of a memory: by default the text's own token embeddings
    (lossless: injecting them equals having the text in the prompt); with slots=m, the means
    of m contiguous chunks of them (compressed, lossy)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("embed_memory: text is empty")
    e = embed(np.asarray(ids, np.int32))
    if slots is None or slots >= len(e):
        return e
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    return pool_rows(e, slots)


def pool_rows(e: np.ndarray, slots: int) -> np.ndarray:
    """Mean of `slots` contiguous, nearly equal chunks of the rows of e (compressed memory)."""
    bounds = np.linspace(0, len(e), slots + 1).round().astype(int)
    return np.stack([e[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]).astype(np.float32)
