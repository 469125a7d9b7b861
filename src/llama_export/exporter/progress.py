"""Progress on stderr: numbered steps with timings, and a counter for long loops."""

from __future__ import annotations

import sys
import time

from llama_export.exporter.signals import raise_if_terminated


class Progress:
    def __init__(self, total_steps: int, stream=None, quiet: bool = False):
        self.total, self.step, self.quiet = total_steps, 0, quiet
        self.stream = stream or sys.stderr
        self.started = None

    def log(self, message: str) -> None:
        raise_if_terminated()
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def begin(self, title: str) -> None:
        self.step += 1
        self.started = time.perf_counter()
        self.log(f"[{self.step}/{self.total}] {title}")

    def end(self, detail: str = "") -> None:
        took = time.perf_counter() - self.started
        self.log(f"      done in {took:.1f}s" + (f": {detail}" if detail else ""))

    def counter(self, label: str):
        """A callback (done, total) that redraws one line on a terminal and prints every 10% otherwise."""
        tty = self.stream.isatty()
        last = [-1]
        started = time.perf_counter()

        def update(done: int, total: int) -> None:
            raise_if_terminated()
            if self.quiet:
                return
            elapsed = time.perf_counter() - started
            left = f", about {format_seconds(elapsed / done * (total - done))} left" if 0 < done < total else ""
            if tty:
                end = "\n" if done == total else ""
                print(f"\r      {label} {done}/{total}{left}\033[K", end=end, file=self.stream, flush=True)
            elif done * 10 // total != last[0]:
                last[0] = done * 10 // total
                print(f"      {label} {done}/{total}{left}", file=self.stream, flush=True)

        return update


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
