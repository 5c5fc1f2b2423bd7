"""Which memories a generate() call injects.

1. Candidates: the bank's own index searched with the query's key (model.embed_key: meaning),
   and BM25 over the memories' texts (bm25s, with an English stemmer: names, numbers, rare
   words). Scores are fused: dense score + LEXICAL_WEIGHT * BM25 / (the best BM25 score), so
   that a query that shares no word still ranks by meaning, and a name decides between
   memories that mean much the same.
2. Relevance: the model itself judges each of the best `k` candidates, as pointwise mutual
   information in both directions, in nats per token:
   - forward: how much reading the memory makes the query more predictable, the mean over the
     query's tokens of log p(token | "Context: memory\nQuestion:") - log p(token | "Context: none\nQuestion:");
   - backward: how much the query makes the memory more predictable, the mean over the memory's
     tokens of log p(token | "Question: query\nFact:") - log p(token | "Question: none\nFact:").
   The relevance is their mean. Forward alone lets a general question pass on a memory that
   shares its topic ("Name three musical instruments." and "Hollis plays the banjo."): the
   memory makes the question's words likely, but the question does not ask for the memory.
   Candidates below `min_score` are dropped, so a question that no memory is about is asked
   exactly as without a bank.

The relevance passes run as sequences of their own in the KV cache's last rows, so the cached
conversation (and its prefix reuse) stays.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

LEXICAL_WEIGHT = 0.5
# Calibrated on SmolLM2 and Gemma 3 over four fact sets (three of tests/facts.py and one held
# out) and 80 general questions (bench/memory_relevance.py, bench/README.md): the memory a fact question
# needs passes (0.98 of them), a general question's best candidate rarely does (2.5%).
MIN_SCORE = 1.3
CANDIDATES = 32  # per retriever, before fusion
FORWARD_CONTEXT = "Context: {}\nQuestion:"   # then the query's tokens
BACKWARD_CONTEXT = "Question: {}\nFact:"     # then the memory's tokens
NONE = "none"  # stands for the memory or the query in the passes without it
BASE_CACHE = 4096  # memories whose backward pass without a query is kept


@dataclass
class Candidate:
    id: int
    score: float       # the fused ranking score
    dense: float       # the bank's score of the query key (cosine by default)
    lexical: float     # BM25 score of the query against the memory's text
    relevance: float = float("nan")  # nats per query token (relevance check)


_per_thread = threading.local()


def stemmer():
    """The English stemmer of BM25's words (and of ChatMemory's content words), one per thread
    (PyStemmer's are not thread-safe)."""
    if not hasattr(_per_thread, "stemmer"):
        import Stemmer

        _per_thread.stemmer = Stemmer.Stemmer("english")
    return _per_thread.stemmer


class LexicalIndex:
    """BM25 over a bank's texts, rebuilt when they have changed since (bank.version). One search or
    rebuild at a time (a lock), as the bank is shared between threads."""

    def __init__(self):
        self.version = None
        self.ids = np.zeros(0, np.int64)
        self.bm25 = None
        self._lock = threading.Lock()

    def tokenize(self, texts):
        import bm25s

        return bm25s.tokenize(texts, stemmer=stemmer(), show_progress=False, return_ids=False)

    def refresh(self, bank) -> None:
        version = bank.version  # read before the texts: changes bump it after they are made
        if self.version == version:
            return
        import bm25s

        pairs = [(i, t) for i, t in bank._bank.texts_all() if t.strip()]
        self.ids = np.asarray([i for i, _ in pairs], np.int64)
        self.bm25 = None
        if pairs:
            self.bm25 = bm25s.BM25()
            self.bm25.index(self.tokenize([t for _, t in pairs]), show_progress=False)
        self.version = version

    def search(self, bank, query: str, n: int) -> dict[int, float]:
        """id -> BM25 score of the n best memories that share a word with the query."""
        words = self.tokenize([query])[0]
        with self._lock:
            self.refresh(bank)
            if self.bm25 is None or not words:
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
    """relevance(memory_text, query) in nats per token, the mean of forward and backward PMI. The
    passes without the memory (per query) and without the query (per memory) are computed once.
    logprobs(ids, first) -> log p(ids[t] | ids[:t]) for t >= first (a sequence run on its own)."""

    def __init__(self, tokenizer, logprobs: Callable[[list[int], int], np.ndarray], max_tokens: int):
        self.tokenizer, self.logprobs, self.max_tokens = tokenizer, logprobs, max_tokens
        self._query_base: tuple[str, np.ndarray] | None = None
        self._memory_base: dict[str, np.ndarray] = {}

    def _tokens(self, one_line: str) -> list[int]:
        """The scored tokens of a query or memory (on one line): at most half the context."""
        if not one_line:
            return []
        return self.tokenizer.encode(" " + one_line, add_special_tokens=False)[:self.max_tokens // 2]

    def _logp(self, template: str, given: str, scored: list[int]) -> np.ndarray:
        """log p of the `scored` tokens after template.format(given)."""
        ctx = self.tokenizer.encode(template.format(given))
        over = len(ctx) + len(scored) - self.max_tokens
        if over > 0:  # a text longer than the context: its beginning stands for it
            words = self.tokenizer.encode(given, add_special_tokens=False)
            ctx = self.tokenizer.encode(template.format(
                self.tokenizer.decode(words[:max(0, len(words) - over - 2)])))
        return self.logprobs(ctx + scored, len(ctx))

    def parts(self, memory_text: str, query: str) -> tuple[float, float]:
        """(forward, backward) PMI in nats per token; -inf for an empty text."""
        query, memory = " ".join(query.split()), " ".join(memory_text.split())
        q, m = self._tokens(query), self._tokens(memory)
        if not q or not m:
            return float("-inf"), float("-inf")
        if self._query_base is None or self._query_base[0] != query:
            self._query_base = (query, self._logp(FORWARD_CONTEXT, NONE, q))
        if memory not in self._memory_base:
            if len(self._memory_base) >= BASE_CACHE:
                self._memory_base.pop(next(iter(self._memory_base)))
            self._memory_base[memory] = self._logp(BACKWARD_CONTEXT, NONE, m)
        forward = np.mean(self._logp(FORWARD_CONTEXT, memory, q) - self._query_base[1])
        backward = np.mean(self._logp(BACKWARD_CONTEXT, query, m) - self._memory_base[memory])
        return float(forward), float(backward)

    def __call__(self, memory_text: str, query: str) -> float:
        return sum(self.parts(memory_text, query)) / 2


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
