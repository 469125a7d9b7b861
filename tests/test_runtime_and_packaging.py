"""Sampling, streaming text, and the staging of package folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtimes import Sampler
from runtimes.generate import TextStream
from targets import TargetError
from targets.staging import check_output, staged_package


def test_greedy_and_seeded_sampling():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler()(logits) == 1
    assert Sampler(temperature=1.0, top_k=1)(logits) == 1
    draws = [Sampler(temperature=1.0, seed=7)(logits) for _ in range(5)]
    assert len(set(draws)) == 1  # the same seed gives the same draw
    many = Sampler(temperature=1.0, top_k=2, seed=0)
    picks = {many(logits) for _ in range(200)}
    assert picks == {1, 2}  # top-k keeps only the two likeliest
    nucleus = Sampler(temperature=1.0, top_p=0.3, seed=0)
    assert {nucleus(logits) for _ in range(100)} == {1}
    with pytest.raises(ValueError):
        Sampler(top_p=0.0)


def test_text_stream_holds_back_partial_characters():
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!"}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    stream = TextStream(decode)
    assert [stream.push(t) for t in (1, 2, 3, 4)] == ["caf", "", "é", "!"]


def test_failed_export_leaves_nothing(tmp_path):
    out = tmp_path / "pkg"
    with pytest.raises(RuntimeError):
        with staged_package(out, force=False) as staging:
            (staging / "model.onnx").write_text("half")
            raise RuntimeError("interrupted")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_success_replaces_an_old_package(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"tool": "llama-export"}))
    (out / "stale.txt").write_text("x")
    with staged_package(out, force=False) as staging:
        (staging / "manifest.json").write_text(json.dumps({"tool": "llama-export", "new": True}))
    assert json.loads((out / "manifest.json").read_text())["new"] and not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_check_output_refuses_foreign_folders(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x").write_text("1")
    with pytest.raises(TargetError, match="--force"):
        check_output(tmp_path / "data", force=False)
    check_output(tmp_path / "data", force=True)
    check_output(tmp_path / "new", force=False)


def test_swap_without_renameat2_replaces_and_restores(tmp_path, monkeypatch):
    """Where the kernel has no renameat2, two renames: a package replaced, and the old one put back when the
    second rename fails."""
    import targets.staging as staging_module

    monkeypatch.setattr(staging_module, "_renameat2", lambda source, dest, flags: False)
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"tool": "llama-export", "old": True}))
    with staged_package(out, force=False) as staging:
        (staging / "manifest.json").write_text(json.dumps({"tool": "llama-export", "new": True}))
    assert json.loads((out / "manifest.json").read_text()) == {"tool": "llama-export", "new": True}
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]

    real_rename = type(out).rename

    def failing_rename(self, target):
        if self.name.startswith(".pkg.partial-") and not self.name.endswith("-old"):
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", failing_rename)
    with pytest.raises(TargetError, match="writing the package"):
        with staged_package(out, force=False) as staging:
            (staging / "manifest.json").write_text("{}")
    assert json.loads((out / "manifest.json").read_text())["new"] and [p.name for p in tmp_path.iterdir()] == ["pkg"]
