"""Fixtures: tiny random LLaMA models of each generation's shape, and the real default model (helpers.py holds what
the tests import)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import VARIANTS, make_hf_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Traced graphs are shared by this session's exports (in-process and child processes alike), never the user's cache.
os.environ["LLAMA_EXPORT_TRACE_CACHE"] = tempfile.mkdtemp(prefix="llama-export-test-cache-")
atexit.register(shutil.rmtree, os.environ["LLAMA_EXPORT_TRACE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_hf_model(root / name, name) for name in VARIANTS}


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from llama_export.exporter.default_model import default_model_path

    return default_model_path(log=lambda m: None)


@pytest.fixture(scope="session")
def default_package(tmp_path_factory, default_gguf) -> Path:
    """The real default model exported once for the session, through the CLI as a user runs it."""
    from llama_export.exporter.cli import main

    output = tmp_path_factory.mktemp("default") / "smollm2-cpu"
    assert main(["--target", "cpu", "--model", str(default_gguf), "--output", str(output), "--quiet"]) == 0
    return output
