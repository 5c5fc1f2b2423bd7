"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty (HF semantics).

Generation samples in the core (`_core.Sampler`, csrc/model/sampler.cpp: one call per decode
step samples every sequence of a batch); `Sampler` here is its plain numpy reference, which the
tests hold it to."""
from __future__ import annotations

import numpy as np


def check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed) -> None:
    """Raises ValueError naming the first sampling argument out of range or of the wrong type."""
    def number(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        return v

    if number("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0 < number("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= number("min_p", min_p) < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
    if number("repetition_penalty", repetition_penalty) <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


def core_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None):
    """The engine's sampler for one sequence (arguments checked first)."""
    from . import _core

    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    return _core.Sampler(float(temperature), top_k, float(top_p), float(min_p), float(repetition_penalty),
                         -1 if seed is None else seed)


class Sampler:
    """The numpy reference of the core sampler: the same filters, and the same distribution (its
    random stream is numpy's, so seeded draws differ from the core's)."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None):
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), top_k, float(top_p), float(min_p)
        self.repetition_penalty = float(repetition_penalty)
        self.rng = np.random.default_rng(seed)

    def penalized(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        if self.repetition_penalty != 1.0 and len(history):
            logits = logits.copy()
            seen = np.unique(np.asarray(history))
            x = logits[seen]
            logits[seen] = np.where(x > 0, x / self.repetition_penalty, x * self.repetition_penalty)
        return logits

    def probs(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """The distribution a token is drawn from (temperature > 0), float64 summing to 1."""
        x = self.penalized(logits, history).astype(np.float64) / self.temperature
        if self.top_k and self.top_k < x.size:
            kth = np.partition(x, -self.top_k)[-self.top_k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.min_p > 0:
            p = np.where(p < self.min_p * p.max(), 0.0, p)
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = cum - p[order] < self.top_p  # smallest prefix whose mass reaches top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
        return p / p.sum()

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(self.penalized(logits, history)))
        p = self.probs(logits, history)
        return int(self.rng.choice(p.size, p=p))
