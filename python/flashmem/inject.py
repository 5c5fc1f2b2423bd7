"""Input assembly for generate(): token ids, caller-given input embeddings and memory slots
retrieved from a MemoryBank, laid out as one sequence of positions.

The engine receives `src` (int32, one per position: a token id, or -(row+1) for row `row` of
`embeds`) and `embeds` (rows, d_model) float32, and builds the forward pass's input buffer from
them in C++ (token rows gathered from the embedding table, embedding rows copied in).

Each position also gets a key (the token id, or the hash of its embedding segment and the row
in it), so a later generate() can reuse the KV-cache entries of the longest common prefix
instead of recomputing them (prefix caching).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Inputs:
    src: np.ndarray                # (T,) int32
    embeds: np.ndarray | None      # (rows, d) float32
    keys: list                     # (T,) position identities for prefix reuse
    token_ids: list[int]           # the token positions' ids (for the repetition penalty)
    memories: list[dict] = field(default_factory=list)
    retrieval_s: float = 0.0       # bank search inside generate()
    assemble_s: float = 0.0        # everything before the forward pass (retrieval, tokenization)


class InputBuilder:
    def __init__(self, d_model: int):
        self.d = d_model
        self.src: list[int] = []
        self.rows: list[np.ndarray] = []
        self.keys: list = []
        self.n_rows = 0
        self.token_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.src)

    def tokens(self, ids) -> None:
        ids = [int(t) for t in ids]
        self.src += ids
        self.keys += ids
        self.token_ids += ids

    def embeddings(self, arr, what: str) -> None:
        """Appends the rows of arr (n, d_model) as positions; checked for shape and finite values."""
        a = np.asarray(arr)
        if a.ndim != 2 or a.shape[1] != self.d:
            raise ValueError(f"{what} must have shape (n, {self.d}) (d_model {self.d}), got {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{what} must be a float array, got dtype {a.dtype}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            r, c = np.argwhere(~np.isfinite(a))[0]
            raise ValueError(f"{what} has a non-finite value at row {r}, column {c}")
        if not len(a):
            return
        ident = hashlib.blake2b(a.tobytes(), digest_size=16).digest()
        self.src += range(-self.n_rows - 1, -self.n_rows - 1 - len(a), -1)
        self.keys += [(ident, i) for i in range(len(a))]
        self.rows.append(a)
        self.n_rows += len(a)

    def build(self, memories=None, retrieval_s: float = 0.0) -> Inputs:
        embeds = np.concatenate(self.rows) if self.rows else None
        return Inputs(np.asarray(self.src, np.int32), embeds, self.keys, self.token_ids, memories or [], retrieval_s)


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pool_rows(e: np.ndarray, slots: int) -> np.ndarray:
    """Mean of `slots` contiguous, nearly equal chunks of the rows of e (compressed memory)."""
    bounds = np.linspace(0, len(e), slots + 1).round().astype(int)
    return np.stack([e[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]).astype(np.float32)
