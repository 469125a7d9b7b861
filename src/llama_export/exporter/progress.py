"""Progress on stderr: numbered steps with timings and peak memory, and for long loops a live bar with the rate
and the time left on a terminal (tqdm), a plain line every tenth of the way otherwise."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from llama_export.exporter.signals import raise_if_terminated


class Progress:
    def __init__(self, total_steps: int, stream=None, quiet: bool = False):
        self.total, self.step, self.quiet = total_steps, 0, quiet
        self.stream = stream or sys.stderr
        self.started, self.title = None, None
        self.stages: list[dict] = []  # each finished step: title, seconds, the process's peak memory by then

    def log(self, message: str) -> None:
        raise_if_terminated()
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def begin(self, title: str) -> None:
        self.step += 1
        self.started, self.title = time.perf_counter(), title
        self.log(f"[{self.step}/{self.total}] {title}")

    def end(self, detail: str = "") -> None:
        took = time.perf_counter() - self.started
        self.stages.append({"step": self.title, "seconds": round(took, 2), "peak_memory_gb": peak_memory_gb()})
        self.log(f"      done in {took:.1f}s" + (f": {detail}" if detail else ""))

    def counter(self, label: str, unit: str = "it"):
        """A callback (done, total): a tqdm bar on a terminal, a line every 10% otherwise, nothing when quiet."""
        if self.quiet:
            return lambda done, total: raise_if_terminated()
        if self.stream.isatty():
            return _bar(label, unit, self.stream)
        last = [-1]
        started = time.perf_counter()

        def update(done: int, total: int) -> None:
            raise_if_terminated()
            if total and done * 10 // total != last[0]:
                last[0] = done * 10 // total
                elapsed = time.perf_counter() - started
                rate = f", {done / elapsed:.2f} {unit}/s" if 0 < done and elapsed > 0 else ""
                print(f"      {label} {done}/{total}{rate}{_time_left(elapsed, done, total)}", file=self.stream,
                      flush=True)

        return update

    @contextlib.contextmanager
    def ticking(self, label: str):
        """A step with no count to show (one long call): the time it has taken, redrawn every second on a
        terminal."""
        if self.quiet or not self.stream.isatty():
            yield
            return
        from tqdm import tqdm

        bar = tqdm(desc=f"      {label}", file=self.stream, bar_format="{desc}: {elapsed}", leave=False)
        stop = threading.Event()
        thread = threading.Thread(target=lambda: [bar.refresh() for _ in iter(lambda: stop.wait(1), True)],
                                  daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            bar.close()


_OPEN_BARS: list = []  # bars drawn and not finished: closed before an error is printed (close_bars)


def _bar(label: str, unit: str, stream):
    """tqdm's bar, opened at the first call and closed when done reaches total."""
    from tqdm import tqdm

    bars = []

    def update(done: int, total: int) -> None:
        raise_if_terminated()
        if not bars:
            bars.append(tqdm(total=total, desc=f"      {label}", unit=unit, file=stream, dynamic_ncols=True))
            _OPEN_BARS.append(bars[0])
        bars[0].update(done - bars[0].n)
        if done >= total and bars[0] in _OPEN_BARS:
            _OPEN_BARS.remove(bars[0])
            bars[0].close()

    return update


def close_bars() -> None:
    """End every unfinished bar's line, so a message printed next starts on a line of its own."""
    while _OPEN_BARS:
        _OPEN_BARS.pop().close()


def peak_memory_gb() -> float | None:
    """This process's largest resident memory so far (Linux reports kilobytes, macOS bytes; None on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 30 if sys.platform == "darwin" else 1 << 20), 3)


def _time_left(elapsed: float, done: int, total: int) -> str:
    """", about 1m05s left" at the pace so far; nothing before the first or after the last."""
    return f", about {format_seconds(elapsed / done * (total - done))} left" if 0 < done < total else ""


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def counter_for(log, label: str, unit: str = "it"):
    """A (done, total) callback for a loop handed only a `log` function: the bar of the Progress whose `log` it
    is, else a line through `log` at each call (callers that print their own lines)."""
    owner = getattr(log, "__self__", None)
    if isinstance(owner, Progress):
        return owner.counter(label, unit)
    started = time.perf_counter()

    def update(done: int, total: int) -> None:
        raise_if_terminated()
        if log is None:
            return
        elapsed = time.perf_counter() - started
        log(f"      {label} {done}/{total} ({format_seconds(elapsed)} so far{_time_left(elapsed, done, total)})")

    return update
