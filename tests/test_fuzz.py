"""The source readers and config checks under hypothesis (tests/fuzz_sources.py), a fixed set of examples, in a
process whose address space is capped: a reader that allocates from a claimed count fails it with MemoryError."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE = 4 << 30  # torch reserves address space beyond what it touches; resident memory is checked below


def run_fuzz(work: Path, *args: str, timeout: int) -> dict:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    result = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz_sources.py"), "--work", str(work), *args],
                            capture_output=True, text=True, timeout=timeout, preexec_fn=cap, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_readers_refuse_or_load_every_mutation(tmp_path):
    report = run_fuzz(tmp_path, "--examples", "150", timeout=600)
    assert report["peak_rss_mb"] < 2048, report
    for kind in ("gguf", "safetensors", "config"):
        outcomes = report["counts"][kind]
        assert sum(outcomes.values()) >= 100, report  # hypothesis ran the examples, not a handful
        assert outcomes.get("refused", 0) > 0 and outcomes.get("loaded", 0) > 0, report
