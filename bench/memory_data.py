"""Real vectors for memory-bank tests and benchmarks, from SmolLM2-135M (d = 576):
the rows of its token-embedding matrix, then final hidden states of the model over Tiny
Shakespeare (512-token windows). Cached as .npy in the flashmem cache folder."""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def token_embeddings() -> np.ndarray:
    import gguf

    from flashmem.checkpoints.default_model import default_gguf

    r = gguf.GGUFReader(default_gguf())
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(-1, 576)


def hidden_states(n: int, text: str, window: int = 512) -> np.ndarray:
    import flashmem

    from flashmem.checkpoints.store import store_dir

    path = os.path.join(store_dir(), f"shakespeare_hidden_{n}.npy")
    if os.path.isfile(path):
        return np.load(path)
    model = flashmem.load(dtype="f16", max_context=window)
    ids = model.tokenizer.encode(text)
    out, pos = [], 0
    while sum(len(o) for o in out) < n:
        if pos + window > len(ids):
            raise ValueError(f"text too short for {n} hidden states")
        out.append(model.hidden_states(ids[pos:pos + window]))
        pos += window
    h = np.concatenate(out)[:n].astype(np.float32)
    np.save(path, h)
    return h


def real_vectors(n_hidden: int, text: str) -> np.ndarray:
    """Token embeddings (49152) followed by n_hidden hidden states, shuffled."""
    x = np.concatenate([token_embeddings(), hidden_states(n_hidden, text)])
    return x[np.random.default_rng(0).permutation(len(x))]
