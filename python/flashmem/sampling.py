"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty (HF semantics)."""
from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None):
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
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), top_k, float(top_p), float(min_p)
        self.repetition_penalty = float(repetition_penalty)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        if self.repetition_penalty != 1.0 and history:
            logits = logits.copy()
            seen = np.unique(np.asarray(history))
            x = logits[seen]
            logits[seen] = np.where(x > 0, x / self.repetition_penalty, x * self.repetition_penalty)
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temperature
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
        p /= p.sum()
        return int(self.rng.choice(p.size, p=p))
