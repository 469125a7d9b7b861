"""The C and C# programs shipped in the package (`llama-export programs`), built with their Makefiles and run on
the default model's cpu package: what they print must be exactly the text of transformers' greedy continuation
(PyTorch, fp32)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli

# Prompts the programs were not written around: plain prose, a list, French with accents.
PROMPTS = ("Water boils at a temperature of", "List three primary colors:\n1.", "Le petit déjeuner français")
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def expected_text(default_package, default_gguf) -> dict[str, str]:
    """transformers' greedy continuation of each prompt, decoded with the package's tokenizer."""
    import json

    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import reference_model
    from llama_export.runtimes.tokenizer import PackageTokenizer

    model = reference_model(open_checkpoint(default_gguf))
    tokenizer = PackageTokenizer(default_package)
    eos = json.loads((default_package / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    texts = {}
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos[0],
                                 attention_mask=torch.ones((1, len(ids)), dtype=torch.long))
        new = [t for t in out[0, len(ids):].tolist() if t not in eos]
        texts[prompt] = tokenizer.decode(new)
    assert all(texts.values())
    return texts


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> Path:
    """The programs as a user gets them: copied out of the installed package by `llama-export programs`."""
    where = run_cli("programs")
    assert where.returncode == 0, where.stderr
    assert (Path(where.stdout.strip()) / "c" / "llama_chat.c").is_file()
    folder = tmp_path_factory.mktemp("programs") / "copy"
    copied = run_cli("programs", "--copy", str(folder))
    assert copied.returncode == 0 and copied.stdout.strip() == str(folder), copied.stderr
    again = run_cli("programs", "--copy", str(folder))
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1 and "exists" in again.stderr
    return folder


def _build(programs: Path, folder: str, product: str) -> Path:
    result = subprocess.run(["make", "-C", str(programs / folder), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    program = programs / folder / product
    assert program.is_file()
    return program


def _check_program(command: list[str], package: Path, expected: dict[str, str], tmp_path: Path) -> None:
    for prompt, text in expected.items():
        result = subprocess.run([*command, str(package), prompt, str(NEW_TOKENS)], capture_output=True)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode("utf-8") == text + "\n", prompt
    missing = subprocess.run([*command, str(tmp_path / "no-such-package"), "Hello", "5"], capture_output=True,
                             text=True)
    assert missing.returncode == 1 and missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1 and "no-such-package" in missing.stderr
    for bad in (["Hello", "zero"], ["Hello", "0"], ["Hello"]):
        wrong = subprocess.run([*command, str(package), *bad], capture_output=True, text=True)
        assert wrong.returncode == 2 and wrong.stdout == "" and "usage:" in wrong.stderr


def test_c_program_prints_the_reference_continuation(default_package, expected_text, programs, tmp_path):
    program = _build(programs, "c", "llama-chat")
    _check_program([str(program)], default_package, expected_text, tmp_path)


def test_csharp_program_prints_the_reference_continuation(default_package, expected_text, programs, tmp_path):
    if not (shutil.which("mcs") and shutil.which("mono")):
        pytest.skip("mono is not installed (Debian: mono-mcs mono-runtime; .ci/run installs them)")
    program = _build(programs, "csharp", "LlamaChat.exe")
    _check_program(["mono", str(program)], default_package, expected_text, tmp_path)
