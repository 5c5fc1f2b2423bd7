"""Memory encoders from the model itself: a key for a MemoryBank, and a memory's value embeddings.
They take what they need from the model (its tokenizer and embedding lookup), not the model."""
from __future__ import annotations

from typing import Callable

import numpy as np


# The "prompt" key: the model reads the text inside a prompt that asks for its meaning in one
# word, and the key is its state at the last token (PromptEOL, Jiang et al. 2023), a late layer's
# FFN input, centred on the mean state of everyday sentences (the direction every text shares).
KEY_PROMPT = 'This sentence : "{}" means in one word:"'
KEY_LAYER_SHARE = 0.9  # the layer read, as a share of the depth (27 of SmolLM2's 30, 16 of Gemma 3's 18)
CENTRE_SENTENCES = [
    "The weather was cold this morning.", "She opened the door and walked in.", "Prices rose again last year.",
    "How do I bake bread?", "The meeting starts at noon.", "What time is it?", "He likes to read books.",
    "Where is the station?", "The river flows to the sea.", "Can you help me with this?", "My phone battery is low.",
    "Who won the game yesterday?", "They moved to a new house in spring.", "Is this seat taken?",
    "The report is due on Friday.", "Please send me the file."]
POOLINGS = ("prompt", "embedding", "hidden")


class KeyEncoder:
    """A unit-norm key (d_model,) of a text. pooling="prompt" (default): the model's own state at
    the end of KEY_PROMPT around the text (one forward pass through 90% of the layers, in KV rows
    that leave the cached conversation usable); it matches meaning, not only words (paraphrased
    questions find their facts). "embedding": the mean of the text's token embeddings minus the
    mean row of the embedding table (runs no layer; matches words). "hidden": the mean of the final
    hidden states."""

    def __init__(self, tokenizer, embed: Callable, hidden_states: Callable, sequence_state: Callable,
                 vocab_size: int, d_model: int, n_layers: int, max_tokens: int):
        self.tokenizer, self.embed, self.hidden_states, self.sequence_state = (
            tokenizer, embed, hidden_states, sequence_state)
        self.vocab_size, self.d_model, self.max_tokens = vocab_size, d_model, max_tokens
        self.layer = min(n_layers - 1, round(KEY_LAYER_SHARE * n_layers))
        self._embed_mean = None  # mean row of the embedding table, computed on first use
        self._prompt_centre = None  # mean prompt state of CENTRE_SENTENCES, computed on first use

    def __call__(self, text: str, pooling: str = "prompt") -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"embed_key: text must be a string, got {type(text).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids or not text.strip():
            raise ValueError("embed_key: text is empty")
        if pooling == "prompt":
            v = self.prompt_state(text) - self.prompt_centre()
        elif pooling == "embedding":
            v = self.embed(np.asarray(ids, np.int32)).mean(0) - self.embedding_mean()
        else:
            v = self.hidden_states(ids).mean(0)
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)

    def prompt_state(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(KEY_PROMPT.format(text.strip()))
        over = len(ids) - self.max_tokens
        if over > 0:  # a text longer than the context: its beginning stands for it
            words = self.tokenizer.encode(text.strip(), add_special_tokens=False)
            ids = self.tokenizer.encode(KEY_PROMPT.format(self.tokenizer.decode(words[:max(1, len(words) - over - 2)])))
        return self.sequence_state(ids[:self.max_tokens], self.layer)

    def prompt_centre(self) -> np.ndarray:
        if self._prompt_centre is None:
            self._prompt_centre = np.mean([self.prompt_state(t) for t in CENTRE_SENTENCES], axis=0)
        return self._prompt_centre

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
