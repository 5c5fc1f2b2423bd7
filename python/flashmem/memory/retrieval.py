"""Which memories a generate() call injects.

1. Candidates: the bank's own index searched with the query's key (model.embed_key: meaning),
   and BM25 over the memories' texts (bm25s, with an English stemmer: names, numbers, rare
   words). Scores are fused: dense score + LEXICAL_WEIGHT * BM25 / (the best BM25 score), so
   that a query that shares no word still ranks by meaning, and a name decides between
   memories that mean much the same.
2. Relevance: the model itself judges each of the best `k` candidates. A memory is relevant to
   a query when reading it makes the query more predictable: its relevance is the mean over the
   query's tokens of log p(token | "Context: memory") - log p(token | "Context: none"), in nats
   (pointwise mutual information). Candidates below `min_score` are dropped, so a question that
   no memory is about is asked exactly as without a bank.

The relevance passes run as sequences of their own in the KV cache's last rows, so the cached
conversation (and its prefix reuse) stays.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

LEXICAL_WEIGHT = 0.5
# Calibrated on three fact sets (bench/memory_qa.py): with this threshold 95% of general
# questions get no memory while the memory a fact question needs passes.
MIN_SCORE = 1.4
CANDIDATES = 32  # per retriever, before fusion
RELEVANCE_CONTEXT = "Context: {}\nQuestion:"


@dataclass
class Candidate:
    id: int
    score: float       # the fused ranking score
    dense: float       # the bank's score of the query key (cosine by default)
    lexical: float     # BM25 score of the query against the memory's text
    relevance: float = float("nan")  # nats per query token (relevance check)


@lru_cache(maxsize=1)
def stemmer():
    """The English stemmer of BM25's words (and of ChatMemory's content words)."""
    import Stemmer

    return Stemmer.Stemmer("english")


class LexicalIndex:
    """BM25 over a bank's texts, rebuilt when they have changed since (bank.version)."""

    def __init__(self):
        self.version = None
        self.ids = np.zeros(0, np.int64)
        self.bm25 = None

    def tokenize(self, texts):
        import bm25s

        return bm25s.tokenize(texts, stemmer=stemmer(), show_progress=False, return_ids=False)

    def refresh(self, bank) -> None:
        if self.version == bank.version:
            return
        import bm25s

        pairs = [(i, t) for i, t in bank._bank.texts_all() if t.strip()]
        self.ids = np.asarray([i for i, _ in pairs], np.int64)
        self.bm25 = None
        if pairs:
            self.bm25 = bm25s.BM25()
            self.bm25.index(self.tokenize([t for _, t in pairs]), show_progress=False)
        self.version = bank.version

    def search(self, bank, query: str, n: int) -> dict[int, float]:
        """id -> BM25 score of the n best memories that share a word with the query."""
        self.refresh(bank)
        if self.bm25 is None:
            return {}
        words = self.tokenize([query])[0]
        if not words:
            return {}
        s = self.bm25.get_scores(words)
        best = np.argsort(-s)[:n]
        return {int(self.ids[j]): float(s[j]) for j in best if s[j] > 0}


def candidates(bank, query: str, key: np.ndarray, n: int = CANDIDATES) -> list[Candidate]:
    """The bank's memories for `query`, best first (fused dense and lexical scores)."""
    ids, scores = bank.search(key[None], k=min(n, len(bank)))
    dense = {int(i): float(s) for i, s in zip(ids[0], scores[0]) if i >= 0}
    lexical = bank._lexical.search(bank, query, n)
    for i in lexical.keys() - dense.keys():  # the dense score of memories only BM25 found
        stored = bank.get(i).key
        dense[i] = float(stored @ key) if bank.metric != "l2" else -float(((stored - key) ** 2).sum())
    top = max(lexical.values(), default=0.0)
    out = [Candidate(i, d + (LEXICAL_WEIGHT * lexical.get(i, 0.0) / top if top > 0 else 0.0), d, lexical.get(i, 0.0))
           for i, d in dense.items()]
    return sorted(out, key=lambda c: -c.score)


class Relevance:
    """relevance(memory_text, query) in nats per query token; the query-only pass is computed once
    per query. logprobs(ids, first) -> log p(ids[t] | ids[:t]) for t >= first (a sequence run on
    its own)."""

    def __init__(self, tokenizer, logprobs: Callable[[list[int], int], np.ndarray], max_tokens: int):
        self.tokenizer, self.logprobs, self.max_tokens = tokenizer, logprobs, max_tokens
        self._base: tuple[str, np.ndarray] | None = None

    def _query_logp(self, context: str, query_ids: list[int]) -> np.ndarray:
        ctx = self.tokenizer.encode(RELEVANCE_CONTEXT.format(context))
        over = len(ctx) + len(query_ids) - self.max_tokens
        if over > 0:  # a memory longer than the context: its beginning stands for it
            words = self.tokenizer.encode(context, add_special_tokens=False)
            ctx = self.tokenizer.encode(RELEVANCE_CONTEXT.format(
                self.tokenizer.decode(words[:max(0, len(words) - over - 2)])))
        return self.logprobs(ctx + query_ids, len(ctx))

    def __call__(self, memory_text: str, query: str) -> float:
        q = self.tokenizer.encode(" " + query.strip(), add_special_tokens=False)[:self.max_tokens // 2]
        if not q:
            return float("-inf")
        if self._base is None or self._base[0] != query:
            self._base = (query, self._query_logp("none", q))
        one_line = " ".join(memory_text.split())
        return float(np.mean(self._query_logp(one_line, q) - self._base[1]))


def select(bank, query: str, key: np.ndarray, k: int, min_score: float | None,
           relevance: Callable[[str, str], float]) -> list:
    """The up to k memories to inject, as (Candidate, bank Memory): the best k candidates whose
    relevance reaches min_score (None: no relevance check, the best k). When the best candidate is
    not relevant, none is checked further (the common case of a question no memory is about costs
    one check)."""
    chosen = []
    for j, c in enumerate(candidates(bank, query, key, max(CANDIDATES, k))[:k]):
        m = bank.get(c.id)
        if min_score is not None:
            c.relevance = relevance(m.text, query)
            if not c.relevance >= min_score:
                if j == 0:
                    break
                continue
        chosen.append((c, m))
    return chosen
