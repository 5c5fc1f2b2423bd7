"""Real vectors for memory-bank tests and benchmarks, from SmolLM2-135M (d = 576): the rows of
its token-embedding matrix, final hidden states of the model over Tiny Shakespeare (512-token
windows), and the model's memory keys (`embed_key`, its default pooling) of Tiny Shakespeare's
sentences. Cached as .npy in the flashmem cache folder."""
from __future__ import annotations

import os
import re
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


def sentences(text: str, n: int) -> list[str]:
    """The first n distinct sentences of 6 to 40 words in `text`, speaker names dropped."""
    body = re.sub(r"^[A-Z][A-Za-z ]*:$", " ", text, flags=re.M)
    out, seen = [], set()
    for s in re.split(r"(?<=[.?!])\s+", " ".join(body.split())):
        if 6 <= len(s.split()) <= 40 and s not in seen:
            seen.add(s)
            out.append(s)
            if len(out) == n:
                return out
    raise ValueError(f"text has only {len(out)} sentences of 6 to 40 words, {n} wanted")


def text_keys(n: int, text: str) -> np.ndarray:
    """model.embed_key(sentence) for n sentences of `text` (a few minutes per thousand)."""
    import flashmem
    from tqdm import tqdm

    from flashmem.checkpoints.store import store_dir

    path = os.path.join(store_dir(), f"shakespeare_keys_{n}.npy")
    if os.path.isfile(path):
        return np.load(path)
    model = flashmem.load()
    keys = np.stack([model.embed_key(s) for s in tqdm(sentences(text, n), desc="embed_key")]).astype(np.float32)
    np.save(path, keys)
    return keys


def real_vectors(n_hidden: int, text: str) -> np.ndarray:
    """Token embeddings (49152) followed by n_hidden hidden states, shuffled."""
    x = np.concatenate([token_embeddings(), hidden_states(n_hidden, text)])
    return x[np.random.default_rng(0).permutation(len(x))]
