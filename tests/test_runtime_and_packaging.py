"""Sampling, streaming text, and the staging of package folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama_export.runtimes import Sampler
from llama_export.runtimes.generate import TextStream
from llama_export.targets import TargetError
from llama_export.targets.staging import check_output, staged_package


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
    import llama_export.targets.staging as staging_module

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


def test_install_puts_one_package_with_its_data(tmp_path):
    """`pip install .` adds llama_export alone (no generic top-level names such as `targets`), with the texts and
    the C and C# programs as package data."""
    import shutil
    import subprocess
    import sys

    from helpers import REPO

    checkout = tmp_path / "checkout"  # a copy, so the build leaves no build/ folder in the repository
    shutil.copytree(REPO / "src", checkout / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, checkout / name)
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(checkout)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    top = sorted(p.name for p in target.iterdir())
    assert top == ["bin", "llama_export", "llama_export-0.1.0.dist-info"], top
    package = target / "llama_export"
    for data in ("exporter/data/heldout.txt", "exporter/data/texts/heldout/code.txt", "runtimes/c/llama_chat.c",
                 "runtimes/c/Makefile", "runtimes/csharp/LlamaChat.cs", "runtimes/csharp/Makefile"):
        assert (package / data).is_file(), data
    assert sorted(p.name for p in (package / "runtimes" / "c").iterdir()) == ["Makefile", "llama_chat.c", "oga_api.h"]
