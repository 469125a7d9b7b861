"""Bad input: a one-line error naming the problem, a non-zero exit, no traceback, nothing at the output path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import make_hf_model, run_cli, write_tiny_gguf


def error_lines(stderr: str) -> list[str]:
    """The lines that are not step progress ("[1/5] ..." or indented detail)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith(("[", " "))]


def assert_clean_failure(result, output: Path, *fragments: str) -> None:
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    assert lines[0].startswith("llama-export: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*")), "a staging folder was left behind"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("bad") / "tiny", "llama2-gqa")


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("--model", str(tmp_path / "nope"), "-o", str(out)), out, "not found", "nope")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(run_cli("--model", str(tmp_path / "empty"), "-o", str(out)), out, "no config.json")


def test_truncated_safetensors(tmp_path, tiny_folder):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    assert_clean_failure(run_cli("--model", str(folder), "-o", str(out)), out, "truncated", "model.safetensors")


def test_truncated_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    out = tmp_path / "out"
    assert_clean_failure(run_cli("--model", str(path), "-o", str(out)), out, "tiny.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("--model", str(path), "-o", str(out)), out, "not a GGUF file", "junk.gguf")


def copy_with_config(source: Path, folder: Path, **changes) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_non_llama_architecture(tmp_path, tiny_folder):
    folder = copy_with_config(tiny_folder, tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    out = tmp_path / "out"
    assert_clean_failure(run_cli("--model", str(folder), "-o", str(out)), out, "unsupported architecture 'gpt2'")


def test_missing_tensor(tmp_path, tiny_folder):
    folder = copy_with_config(tiny_folder, tmp_path / "model", num_hidden_layers=3)  # the weights hold two
    out = tmp_path / "out"
    assert_clean_failure(run_cli("--model", str(folder), "-o", str(out)), out, "3 decoder layers", "hold 2")
    from safetensors.torch import load_file, save_file

    folder = copy_with_config(tiny_folder, tmp_path / "model-1")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert_clean_failure(run_cli("--model", str(folder), "-o", str(out)), out, "model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_existing_output_that_is_not_a_package_is_refused(tmp_path, tiny_folder, kind):
    out = tmp_path / "precious"
    if kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    result = run_cli("--model", str(tiny_folder), "-o", str(out))
    assert result.returncode != 0
    assert len(error_lines(result.stderr)) == 1 and "--force" in result.stderr
    assert (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) == "keep me"


def test_force_replaces_and_a_package_is_replaced_without_force(tmp_path, tiny_folder):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "notes.txt").write_text("old")
    assert run_cli("--model", str(tiny_folder), "-o", str(out), "--force", "-q").returncode == 0
    assert not (out / "notes.txt").exists() and (out / "manifest.json").is_file()
    # Re-exporting onto a llama-export package needs no --force.
    result = run_cli("--model", str(tiny_folder), "-o", str(out), "-q", "--no-verify")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["parity"] == {"skipped": True}


def test_failed_verify_writes_nothing_and_verify_exits_nonzero(tmp_path, tiny_folder):
    """verify must catch a package that is not the model it claims to be."""
    other = make_hf_model(tmp_path / "other", "llama2-gqa", seed=123)
    out = tmp_path / "pkg"
    assert run_cli("--model", str(tiny_folder), "-o", str(out), "-q", "--no-verify").returncode == 0
    result = run_cli("verify", str(out), "--reference", str(other))
    assert result.returncode == 1 and "FAILED" in result.stdout


def test_bad_arguments_are_one_line(tmp_path):
    for args in (["--target", "nonsense"], ["run"], ["verify"], ["run", str(tmp_path), "--prompt", "x"],
                 ["--precision", "int3", "--model", str(tmp_path)], ["verify", str(tmp_path)]):
        result = run_cli(*args)
        assert result.returncode != 0, args
        assert len(error_lines(result.stderr)) == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_help_for_every_command():
    for args in ([], ["run"], ["verify"], ["targets"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, args
    listing = run_cli("targets")
    assert listing.returncode == 0 and "cpu" in listing.stdout and "fp32" in listing.stdout
