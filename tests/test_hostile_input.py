"""Hostile files, races and signals, through the real CLI: each ends in one line naming the problem, in bounded
time and memory, with nothing half-written and no user file touched."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, make_hf_model, run_cli, write_tiny_gguf
from test_bad_input import assert_clean_failure, copy_with_config, error_lines

# A header case must refuse within this: no allocation from a claimed count, no skeleton from a claimed size.
HEADER_SECONDS, HEADER_MEMORY_KB = 60, 2 << 20


def run_bounded(*args: str) -> subprocess.CompletedProcess:
    """The CLI with its own peak RSS and time checked (an address-space cap makes unbounded growth fail, not
    swap); os.wait4 reports this child's usage alone."""
    import resource
    import tempfile

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (HEADER_MEMORY_KB * 1024 * 2, HEADER_MEMORY_KB * 1024 * 2))

    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "llama_export", *args], stdout=out, stderr=err, text=True,
                                   cwd=REPO, preexec_fn=limit)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())
    assert time.monotonic() - started < HEADER_SECONDS, args
    assert usage.ru_maxrss < HEADER_MEMORY_KB, f"{usage.ru_maxrss} kB"
    return result


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hostile") / "tiny", "llama2-gqa")


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("hostile-gguf") / "tiny.gguf"
    write_tiny_gguf(path, arrays={"tokenizer.ggml.tokens": ["tok0", "tok1", "tok2"],
                                  "tokenizer.ggml.token_type": [1, 1, 1]})
    return path.read_bytes()


def patch_after(data: bytes, marker: bytes, fmt: str, value, skip: int = 0) -> bytes:
    """`value` packed over the bytes `skip` bytes after the first occurrence of `marker`."""
    at = data.index(marker) + len(marker) + skip
    return data[:at] + struct.pack("<" + fmt, value) + data[at + struct.calcsize("<" + fmt):]


def export_fails(tmp_path: Path, model: Path, *fragments: str) -> None:
    out = tmp_path / "out"
    assert_clean_failure(run_bounded("--model", str(model), "-o", str(out), "--no-verify"), out, *fragments)


# 2. A GGUF array claiming 2^62 entries.
def test_gguf_array_length_past_the_file_is_refused(tmp_path, tiny_gguf_bytes):
    path = tmp_path / "huge-array.gguf"
    path.write_bytes(patch_after(tiny_gguf_bytes, b"tokenizer.ggml.token_type", "Q", 1 << 62, skip=8))
    export_fails(tmp_path, path, "huge-array.gguf", "tokenizer.ggml.token_type")
    plan = run_bounded("plan", "--target", "jetson-orin", "--model", str(path))
    assert plan.returncode == 1 and len(error_lines(plan.stderr)) == 1 and "token_type" in plan.stderr


# 3. A config or GGUF claiming 100000 layers.
def test_config_claiming_100000_layers_is_refused_before_tracing(tmp_path, tiny_folder):
    folder = copy_with_config(tiny_folder, tmp_path / "deep", num_hidden_layers=100000)
    export_fails(tmp_path, folder, "100000 decoder layers", "the weights hold 2")


def test_gguf_claiming_100000_layers_is_refused_before_tracing(tmp_path, tiny_gguf_bytes):
    path = tmp_path / "deep.gguf"
    path.write_bytes(patch_after(tiny_gguf_bytes, b"llama.block_count", "I", 100000, skip=4))
    export_fails(tmp_path, path, "100000 decoder layers")


# 1 (GGUF form) and 8: tensor data ranges that overlap or a head count of zero.
def test_gguf_with_overlapping_tensors_is_refused(tmp_path, tiny_gguf_bytes):
    name = b"blk.0.attn_k.weight"
    at = tiny_gguf_bytes.index(name) + len(name)
    n_dims = struct.unpack_from("<I", tiny_gguf_bytes, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    path = tmp_path / "overlap.gguf"
    path.write_bytes(tiny_gguf_bytes[:offset_at] + struct.pack("<Q", 0) + tiny_gguf_bytes[offset_at + 8:])
    export_fails(tmp_path, path, "overlap", "blk.0.attn_k.weight")


def test_gguf_head_count_zero_is_refused(tmp_path, tiny_gguf_bytes):
    path = tmp_path / "heads.gguf"
    path.write_bytes(patch_after(tiny_gguf_bytes, b"llama.attention.head_count", "I", 0, skip=4))
    export_fails(tmp_path, path, "num_attention_heads is 0")


# 8 and 11: absurd configs, in export and in plan.
@pytest.mark.parametrize("changes, fragment", [
    ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    ({"vocab_size": -5}, "vocab_size is -5"),
    ({"vocab_size": 10 ** 12}, "model.embed_tokens.weight"),
    ({"max_position_embeddings": 0}, "max_position_embeddings is 0"),
    ({"rope_scaling": {"rope_type": "warp", "factor": 2.0}}, "unknown rope type 'warp'"),
])
def test_absurd_config_is_refused_in_export_and_plan(tmp_path, tiny_folder, changes, fragment):
    folder = copy_with_config(tiny_folder, tmp_path / "model", **changes)
    export_fails(tmp_path, folder, fragment)
    if "rope_scaling" not in changes and changes != {"vocab_size": 10 ** 12}:
        plan = run_bounded("plan", "--target", "jetson-orin", "--config", str(folder / "config.json"))
        assert plan.returncode == 1 and len(error_lines(plan.stderr)) == 1, plan.stderr
        assert fragment in plan.stderr and "Traceback" not in plan.stderr


def test_plan_refuses_zero_heads(tmp_path, tiny_folder):
    folder = copy_with_config(tiny_folder, tmp_path / "model", num_attention_heads=0)
    plan = run_bounded("plan", "--target", "jetson-orin", "--config", str(folder / "config.json"))
    assert plan.returncode == 1 and "num_attention_heads is 0" in plan.stderr and "fits" not in plan.stdout


def test_config_that_is_a_json_list_is_refused(tmp_path, tiny_folder):
    folder = copy_with_config(tiny_folder, tmp_path / "model")
    (folder / "config.json").write_text("[1, 2, 3]")
    export_fails(tmp_path, folder, "config.json", "not a config")


# 8: safetensors headers whose entries lie.
def rewrite_safetensors_header(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(encoded) == length, "the edit must not lengthen the header"
    path.write_bytes(data[:8] + encoded + data[8 + length:])


def first_matrix(header: dict) -> str:
    return next(name for name, info in header.items() if name != "__metadata__" and len(info["shape"]) == 2)


def last_matrix(header: dict) -> str:
    return max((info["data_offsets"][0], name) for name, info in header.items()
               if name != "__metadata__" and len(info["shape"]) == 2)[1]


def test_safetensors_with_trailing_bytes_is_refused(tmp_path, tiny_folder):
    folder = copy_with_config(tiny_folder, tmp_path / "model")
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    export_fails(tmp_path, folder, "model.safetensors", "do not fill the file's data exactly")


def test_hugging_face_cache_snapshot_with_links_loads(tmp_path, tiny_folder):
    """A snapshot's files link into the repository's blobs: followed, and the export's package matches."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for path in tiny_folder.iterdir():
        blob = repo / "blobs" / f"blob-{path.name}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    out = tmp_path / "pkg"
    result = run_cli("--model", str(snapshot), "-o", str(out), "-q", "--no-verify")
    assert result.returncode == 0, result.stderr
    assert (out / "tokenizer.json").read_bytes() == (tiny_folder / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("edit, fragment", [
    (lambda h: h[first_matrix(h)].update(dtype="I8"), "dtype 'I8'"),
    (lambda h: h[first_matrix(h)].update(dtype="F16"), "needs"),
    (lambda h: h[first_matrix(h)].update(data_offsets=h[first_matrix(h)]["data_offsets"][::-1]), "begin <= end"),
    (lambda h: h[last_matrix(h)].update(data_offsets=[0, h[last_matrix(h)]["data_offsets"][1]
                                                     - h[last_matrix(h)]["data_offsets"][0]]), "overlap"),
])
def test_safetensors_entries_that_lie_are_refused(tmp_path, tiny_folder, edit, fragment):
    folder = copy_with_config(tiny_folder, tmp_path / "model")
    rewrite_safetensors_header(folder, edit)
    export_fails(tmp_path, folder, "model.safetensors", fragment)


# 1: a NaN in the source is named; a package whose logits are NaN fails verify.
def test_nan_weight_in_the_source_is_named(tmp_path, tiny_folder):
    import torch
    from safetensors.torch import load_file, save_file

    folder = copy_with_config(tiny_folder, tmp_path / "model")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert torch.isnan(load_file(str(folder / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]).any()
    out = tmp_path / "out"
    assert_clean_failure(run_cli("--model", str(folder), "-o", str(out)), out, "model.layers.1.mlp.up_proj.weight",
                         "NaN")


def test_verify_fails_a_package_with_nan_logits(tmp_path, tiny_folder):
    out = tmp_path / "pkg"
    assert run_cli("--model", str(tiny_folder), "-o", str(out), "-q", "--no-verify").returncode == 0
    data = out / "model.onnx.data"
    values = np.fromfile(data, np.float32)
    values[:] = np.nan
    values.tofile(data)
    result = run_cli("verify", str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not finite" in result.stdout and "prompt 1, position 0" in result.stdout, result.stdout


# 4, 5 and 12: races and signals while an export writes.
def start_export(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llama_export", "--model", str(model), "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def wait_for(pattern: str, folder: Path, process: subprocess.Popen, seconds: float = 300) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = list(folder.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{pattern} never appeared")


def test_sigterm_mid_write_cleans_up_and_says_so(tmp_path, tiny_folder):
    out = tmp_path / "pkg"
    process = start_export(tiny_folder, out)
    wait_for(".pkg.partial-*/model.onnx*", tmp_path, process)  # the staging folder exists from the start
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "terminated (SIGTERM)" in stderr.strip().splitlines()[-1], stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "staging, lock or package left behind"


def test_staging_of_a_killed_export_is_swept_by_the_next_run(tmp_path, tiny_folder):
    out = tmp_path / "pkg"
    process = start_export(tiny_folder, out)
    staging = wait_for(".pkg.partial-*", tmp_path, process)
    process.kill()
    process.communicate()
    assert staging.is_dir() and (tmp_path / ".pkg.lock").is_file()
    assert run_cli("--model", str(tiny_folder), "-o", str(out), "-q", "--no-verify").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_folder_created_at_the_output_during_the_export_is_never_replaced(tmp_path, tiny_folder):
    out = tmp_path / "pkg"
    process = start_export(tiny_folder, out)
    wait_for(".pkg.partial-*", tmp_path, process)
    process.send_signal(signal.SIGSTOP)  # held while the folder appears, so the swap comes after it
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1 and len(error_lines(stderr)) == 1, stderr
    assert "is not a llama-export package" in stderr and str(out) in stderr
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not list(tmp_path.glob(".pkg.*"))


def test_a_second_export_to_the_same_output_refuses(tmp_path, tiny_folder):
    out = tmp_path / "pkg"
    first = start_export(tiny_folder, out, "--no-verify")
    lock = wait_for(".pkg.lock", tmp_path, first)
    while lock.read_text() != str(first.pid):
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # held at its lock while the second export tries
    try:
        second = run_cli("--model", str(tiny_folder), "-o", str(out), "--no-verify")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and len(error_lines(second.stderr)) == 1, second.stderr
    assert f"another export is writing {out} (pid {first.pid})" in second.stderr
    first.communicate(timeout=300)
    assert first.returncode == 0 and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


# 6: the output is the current folder.
def test_output_dot_is_refused_up_front(tmp_path, tiny_folder):
    here = tmp_path / "empty"
    here.mkdir()
    result = subprocess.run([sys.executable, "-m", "llama_export", "--model", str(tiny_folder), "--output", "."],
                            capture_output=True, text=True, cwd=here, timeout=300)
    assert result.returncode == 1 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "is the current folder" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any(here.iterdir())


# 8: an output folder that cannot be written is found before tracing; a full disk is named with its space.
def test_unwritable_output_is_refused_before_tracing(tmp_path, tiny_folder):
    result = run_bounded("--model", str(tiny_folder), "-o", "/proc/llama-export-package")
    assert result.returncode == 1 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "cannot write the package beside /proc/llama-export-package" in result.stderr
    assert "Tracing" not in result.stderr


def test_a_write_that_runs_out_of_room_is_named(tmp_path, tiny_folder):
    import resource

    out = tmp_path / "pkg"

    def small_files():  # writes past 64 kB fail with EFBIG, as they would on a full disk with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    result = subprocess.run([sys.executable, "-m", "llama_export", "--model", str(tiny_folder), "-o", str(out),
                             "--no-verify"], capture_output=True, text=True, cwd=REPO, timeout=300,
                            preexec_fn=small_files)
    assert_clean_failure(result, out, f"writing the package at {out} failed", "GB free there")


# 7, 9 and 8 (run and verify): a small package run past its context, without a tokenizer, with a bad config.
@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory, tiny_folder) -> Path:
    out = tmp_path_factory.mktemp("hostile-pkg") / "pkg"
    result = run_cli("--model", str(tiny_folder), "-o", str(out), "-q", "--no-verify")
    assert result.returncode == 0, result.stderr
    return out


def copy_package(package: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(package, dest)
    return dest


def test_context_is_enforced_in_run_and_eval(tmp_path, tiny_package):
    context = json.loads((tiny_package / "genai_config.json").read_text())["model"]["context_length"]
    long_prompt = " ".join(["the quick brown fox"] * context)
    result = run_cli("run", str(tiny_package), "--prompt", long_prompt, "--max-new-tokens", "2")
    assert result.returncode != 0 and len(error_lines(result.stderr)) == 1, result.stderr
    assert f"past the package's context of {context}" in result.stderr and result.stdout == ""
    result = run_cli("run", str(tiny_package), "--prompt", "the fox", "--max-new-tokens", str(context))
    assert result.returncode == 2 and "--max-new-tokens" in result.stderr and result.stdout == ""
    text = tmp_path / "text.txt"
    text.write_text(long_prompt)
    result = run_cli("eval", str(tiny_package), "--text", str(text), "--window", str(context + 1))
    assert result.returncode == 1 and f"--window {context + 1} is longer" in result.stderr, result.stderr


def test_run_without_a_tokenizer_says_what_to_copy(tmp_path, tiny_package):
    package = copy_package(tiny_package, tmp_path / "pkg")
    (package / "tokenizer.json").unlink()
    result = run_cli("run", str(package), "--prompt", "hello")
    assert result.returncode == 1 and "copy the model's tokenizer.json" in result.stderr
    assert "token ids" not in result.stderr


@pytest.mark.parametrize("config", [{"model": []}, {"model": {"decoder": {"num_hidden_layers": "two"}}}, [1]])
def test_run_on_a_wrong_genai_config_is_one_line(tmp_path, tiny_package, config):
    package = copy_package(tiny_package, tmp_path / "pkg")
    (package / "genai_config.json").write_text(json.dumps(config))
    result = run_cli("run", str(package), "--prompt", "hello")
    assert result.returncode == 1 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "genai_config.json" in result.stderr and "internal error" not in result.stderr


def test_run_refuses_nan_temperature(tiny_package):
    result = run_cli("run", str(tiny_package), "--prompt", "hello", "--temperature", "nan")
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1 and "temperature" in result.stderr


def test_verify_against_a_model_of_another_size_is_refused(tmp_path, tiny_package):
    other = make_hf_model(tmp_path / "other", "llama2-gqa", num_hidden_layers=3)
    result = run_cli("verify", str(tiny_package), "--reference", str(other))
    assert result.returncode == 1 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "is not this package's model (layers 2 vs 3)" in result.stderr


# 10: a tokenizer file linked from outside the model folder is not copied into the package.
def test_tokenizer_linked_from_outside_the_folder_is_refused(tmp_path, tiny_folder):
    folder = copy_with_config(tiny_folder, tmp_path / "model")
    outside = tmp_path / "secret.json"
    outside.write_text('{"secret": true}')
    (folder / "tokenizer_config.json").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").symlink_to(outside)
    export_fails(tmp_path, folder, "tokenizer_config.json", "outside the model folder")


# 8: a GGUF token that is not UTF-8.
def test_gguf_token_with_invalid_utf8_is_refused(tmp_path, tiny_gguf_bytes):
    path = tmp_path / "tokens.gguf"
    data = bytearray(tiny_gguf_bytes)
    token = data.index(b"tok1")
    data[token:token + 4] = b"t\xffk1"
    path.write_bytes(bytes(data))
    export_fails(tmp_path, path, "tokenizer.ggml.tokens'[1] is not valid UTF-8")


def test_weights_linked_from_outside_the_folder_are_refused(tmp_path, tiny_folder):
    folder = copy_with_config(tiny_folder, tmp_path / "model")
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    export_fails(tmp_path, folder, "model.safetensors", "outside the model folder")


def test_names_from_the_file_with_control_characters_stay_on_one_line(tmp_path, tiny_gguf_bytes):
    """A metadata key holding a newline, whose value claims more bytes than the file has (found by the fuzz)."""
    key = b"llama.feed_forward_length"
    data = bytearray(tiny_gguf_bytes)
    at = data.index(key)
    data[at + len(key) - 1] = ord("\n")
    data[at + len(key):at + len(key) + 4] = struct.pack("<I", 8)  # its u32 value read as a string's length
    path = tmp_path / "newline.gguf"
    path.write_bytes(bytes(data))
    export_fails(tmp_path, path, "metadata 'llama.feed_forward_lengt\\n'")
