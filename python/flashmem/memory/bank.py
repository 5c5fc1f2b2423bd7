"""MemoryBank: long-term memory with exact, LSH and ANN lookup (the index lives in the C++ core).

    bank = flashmem.MemoryBank(576, metric="cosine", index="hnsw", M=16, ef_search=64)
    ids = bank.add(keys, values=[emb0, emb1], texts=["a", "b"], metadata=[{"kind": "fact"}, {}])
    hit_ids, scores = bank.search(queries, k=10, filter=lambda md: md.get("kind") == "fact")

Scores are "larger is closer": cosine similarity, inner product, or minus the squared L2 distance.
Missing results (fewer entries than k) come back as id -1 with score -inf.

Recall that holds on new data: the approximate indexes tune their own search settings (ef_search,
nprobe, probes and rerank_per_k) for `target_recall` (recall@10; default 0.95 for hnsw and ivf,
0.9 for lsh) on a sample of the bank's keys, when the bank first reaches 1024 entries and each
time it doubles. Where exact search is as fast as any setting that reaches the target, the bank
searches exactly (get_param("tuned_exact")). Giving a search setting by hand turns tuning off;
target_recall=0 does too. See csrc/memory/tuning.h.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .. import _core

INDEXES = ("flat", "lsh", "ivf", "hnsw")
METRICS = ("cosine", "ip", "l2")


@dataclass
class Memory:
    id: int
    key: np.ndarray  # as stored: normalised for the cosine metric
    value: np.ndarray | None  # (n_slots, d_value) f16 or f32
    text: str
    metadata: dict = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0


def _value_arg(v, where: str):
    """A value array -> (bytes, dtype, n_slots, d_value) for the core; None stays None."""
    if v is None:
        return None
    a = np.asarray(v)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{where}: value must be 2-D (n_slots, d_value), got shape {a.shape}")
    if a.dtype not in (np.float16, np.float32):
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: value contains NaN or inf")
    a = np.ascontiguousarray(a)
    return (a.tobytes(), "f16" if a.dtype == np.float16 else "f32", a.shape[0], a.shape[1])


def metadata_of(md: str, id: int) -> dict:
    """An entry's metadata from its stored JSON text ("" for none); a bank file whose metadata is
    not a JSON object raises ValueError naming the entry."""
    if not md:
        return {}
    try:
        out = json.loads(md)
    except ValueError as e:
        raise ValueError(f"memory {id}: stored metadata is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"memory {id}: stored metadata is not a JSON object: {md:.80}")
    return out


def _json(md, where: str) -> str:
    if md is None:
        return ""
    if not isinstance(md, dict):
        raise ValueError(f"{where}: metadata must be a dict, got {type(md).__name__}")
    try:
        return json.dumps(md)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: metadata is not JSON-serialisable ({e})") from None


class MemoryBank:
    def __init__(self, dim: int, metric: str = "cosine", index: str = "flat", **index_params):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
        params = {}
        for k, v in index_params.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"index parameter {k} must be a number, got {v!r}")
            params[k] = float(v)
        self._bank = _core.MemoryBank(int(dim), metric, index, params)
        self._init_text_index()

    def _init_text_index(self) -> None:
        from .retrieval import LexicalIndex

        self.version = 0  # counts changes to the texts: the BM25 index over them is rebuilt when it moves
        self._version_lock = threading.Lock()
        self._lexical = LexicalIndex()

    def _texts_changed(self) -> None:
        """After a change to the texts (not before: a BM25 refresh in between then rebuilds again)."""
        with self._version_lock:
            self.version += 1

    @classmethod
    def load(cls, path: str, mmap: bool = False) -> "MemoryBank":
        """Loads a bank saved with save(); with mmap=True the keys stay in a private file mapping."""
        self = cls.__new__(cls)
        self._bank = _core.MemoryBank.load(str(path), mmap)
        self._init_text_index()
        return self

    def save(self, path: str) -> None:
        """Atomic: a killed save leaves the previous file intact."""
        self._bank.save(str(path))

    # --- properties ---------------------------------------------------------------------
    dim = property(lambda self: self._bank.dim)
    metric = property(lambda self: self._bank.metric)
    index = property(lambda self: self._bank.index)
    memory_bytes = property(lambda self: self._bank.memory_bytes, doc="bytes held by keys, payloads and index")

    def __len__(self) -> int:
        return len(self._bank)

    def __contains__(self, id) -> bool:
        return self._bank.contains(int(id))

    def ids(self) -> np.ndarray:
        return self._bank.ids()

    def get_param(self, name: str) -> float:
        return self._bank.get_param(name)

    def set_params(self, **params) -> None:
        """Search-time parameters: ef_search (hnsw), nprobe (ivf), probes, rerank_per_k and bits
        (lsh), which turn the bank's own tuning off; or target_recall, which retunes now."""
        for k, v in params.items():
            self._bank.set_param(k, float(v))

    def train(self) -> None:
        """IVF: (re)trains the coarse quantizer on the current entries."""
        if self.index != "ivf":
            raise ValueError(f"train() is for the ivf index, this bank uses {self.index}")
        self._bank.set_param("train", 1.0)

    # --- entries ---------------------------------------------------------------------------
    def _keys(self, keys, what="keys") -> np.ndarray:
        k = np.asarray(keys, dtype=np.float32)
        if k.ndim == 1:
            k = k[None, :]
        if k.ndim != 2 or k.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}), got {np.shape(keys)}")
        return np.ascontiguousarray(k)

    def add(self, keys, ids=None, values=None, texts=None, metadata=None) -> np.ndarray:
        """Adds n entries (all validated before any is added); returns their ids."""
        k = self._keys(keys)
        n = k.shape[0]

        def per_entry(xs, name):
            if xs is None:
                return []
            xs = list(xs)
            if len(xs) != n:
                raise ValueError(f"got {len(xs)} {name} for {n} keys")
            return xs

        vals = [_value_arg(v, f"values[{i}]") for i, v in enumerate(per_entry(values, "values"))]
        txts = per_entry(texts, "texts")
        if any(not isinstance(t, str) for t in txts):
            raise ValueError("texts must be strings")
        mds = [_json(m, f"metadata[{i}]") for i, m in enumerate(per_entry(metadata, "metadata"))]
        id_arr = None if ids is None else np.ascontiguousarray(np.asarray(ids, dtype=np.int64).ravel())
        out = self._bank.add(k, id_arr, vals, txts, mds)
        self._texts_changed()
        return out

    def add_text(self, model, text: str, metadata: dict | None = None, slots: int | None = None,
                 id: int | None = None, pooling: str = "prompt") -> int:
        """Adds a memory from text with the model's own encoders: key model.embed_key(text), value
        model.embed_memory(text, slots) (stored in the model's dtype, f16 or f32, exactly).
        Returns its id."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("add_text: text must be a non-empty string")
        key = model.embed_key(text, pooling=pooling)
        if key.shape[0] != self.dim:
            raise ValueError(f"add_text: the model's keys have dimension {key.shape[0]}, the bank {self.dim}")
        value = model.embed_memory(text, slots)
        if model.dtype == "f16":
            value = value.astype(np.float16)
        ids = None if id is None else [id]
        return int(self.add(key[None], ids=ids, values=[value], texts=[text], metadata=[metadata or {}])[0])

    def get(self, id: int) -> Memory:
        key, raw, dtype, n_slots, d_value, text, md, created, updated = self._bank.get(int(id))
        value = None
        if n_slots:
            value = np.frombuffer(raw, dtype=np.float16 if dtype == "f16" else np.float32).reshape(n_slots, d_value)
        return Memory(int(id), key, value, text, metadata_of(md, id), created, updated)

    def update(self, id: int, key=None, value=None, text: str | None = None, metadata: dict | None = None) -> None:
        k = None if key is None else self._keys(key, "key")[0]
        self._bank.update(int(id), k, _value_arg(value, "value"), text,
                          None if metadata is None else _json(metadata, "metadata"))
        if text is not None:
            self._texts_changed()

    def remove(self, ids) -> None:
        """Forgets entries; unknown ids raise ValueError and nothing is removed."""
        self._bank.remove(np.ascontiguousarray(np.atleast_1d(np.asarray(ids, dtype=np.int64))))
        self._texts_changed()

    def merge(self, ids, key=None, value=None, text: str | None = None, metadata: dict | None = None,
              id: int | None = None) -> int:
        """Combines entries into one (Think-in-Memory's merge), atomically. Defaults: the key is
        the mean of the keys (as stored), the value the concatenation of the values along slots,
        the text the texts joined by newlines, the metadata the dicts merged in order."""
        ids = [int(i) for i in np.atleast_1d(np.asarray(ids, dtype=np.int64))]
        if len(ids) < 1:
            raise ValueError("merge needs at least one id")
        parts = [self.get(i) for i in ids]
        if key is None:
            key = np.mean([p.key for p in parts], axis=0)
        if value is None:
            vs = [p.value for p in parts if p.value is not None]
            if vs and len({v.shape[1] for v in vs}) > 1:
                raise ValueError("cannot concatenate values of different widths; pass value=")
            value = np.concatenate([v.astype(np.float32) if v.dtype != vs[0].dtype else v for v in vs]) if vs else None
        if text is None:
            text = "\n".join(p.text for p in parts if p.text)
        if metadata is None:
            metadata = {}
            for p in parts:
                metadata.update(p.metadata)
        out = self._bank.replace(np.asarray(ids, np.int64), self._keys(key, "key")[0], id,
                                 _value_arg(value, "value"), text, _json(metadata, "metadata"))
        self._texts_changed()
        return out

    # --- search ------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, filter: Callable[[dict], bool] | Iterable[int] | None = None):
        """ids (nq, k) int64 and scores (nq, k) float32, best first. filter: a predicate on an
        entry's metadata dict, or an iterable of allowed ids."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = self._keys(queries, "queries")
        allow = None
        if callable(filter):
            allow = [i for i, md in self._bank.metadata_all() if filter(metadata_of(md, i))]
        elif filter is not None:
            allow = list(filter)
        if allow is not None:
            allow = np.ascontiguousarray(np.asarray(allow, dtype=np.int64).ravel())
        return self._bank.search(q, int(k), allow)
