"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1) or not np.isfinite(temperature):  # NaN fails
            raise ValueError("need temperature >= 0, top-k >= 0 and 0 < top-p <= 1")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / self.temperature
        order = np.argsort(-scores)
        if self.top_k:
            order = order[: self.top_k]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
