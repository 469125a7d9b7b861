"""Generation with a KV cache over any package runner that has `forward` and `empty_cache`."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from llama_export.runtimes.sampling import Sampler


class Decoder:
    """Holds one sequence's KV cache: `prefill` a prompt, then `decode` one token at a time."""

    def __init__(self, package):
        self.package = package
        self.past = package.empty_cache(1)
        self.length = 0

    def _run(self, ids: list[int]) -> np.ndarray:
        self.package.check_length(self.length + len(ids))
        input_ids = np.asarray([ids], dtype=np.int64)
        positions = np.arange(self.length, self.length + len(ids), dtype=np.int64)[None, :]
        mask = np.ones((1, self.length + len(ids)), dtype=np.int64)
        logits, self.past = self.package.forward(input_ids, mask, positions, self.past)
        self.length += len(ids)
        return logits[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Logits for every prompt position, [len(ids), vocab]. Called again, it continues the sequence (a prompt
        prefilled in parts gives the logits of one prefill)."""
        if not ids:
            raise ValueError("empty prompt")
        return self._run(list(ids))

    def decode(self, token: int) -> np.ndarray:
        """Logits after one more token, [vocab]."""
        return self._run([token])[-1]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (the cache's tensors are [batch, heads, positions, head size])."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} of {self.length} cached positions")
        self.past = [tensor[:, :, :length] for tensor in self.past]
        self.length = length


def generate(package, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler | None = None,
             stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yields new token ids until max_new_tokens or a stop token (which is yielded too)."""
    sampler = sampler or Sampler()
    stop_ids = package.eos_token_ids if stop_ids is None else stop_ids
    decoder = Decoder(package)
    logits = decoder.prefill(prompt_ids)[-1]
    for step in range(max_new_tokens):
        token = sampler(logits)
        yield token
        if token in stop_ids or step == max_new_tokens - 1:
            return
        logits = decoder.decode(token)


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.emitted = decode, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        """What is held back at the end (bytes that never completed a character, shown as U+FFFD)."""
        text = self.decode(self.ids)
        piece, self.emitted = text[len(self.emitted):], text
        return piece
