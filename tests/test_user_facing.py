"""What users of the ecosystem expect: chat in the model's template, the Python API, packages Hugging Face tools
open, progress bars and export --json, verify --plot."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_cli, transformers_greedy

import llama_export
from llama_export.runtimes import OnnxPackage, generate
from llama_export.runtimes.tokenizer import PackageTokenizer

QUESTION = "Name three rivers in Europe."
FOLLOW_UP = "Which of them is the longest?"


def chat_cli(package: Path, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_export", "chat", str(package), *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def reference_chat(default_gguf):
    """transformers' greedy reply under the chat template transformers reads from the GGUF itself."""
    from transformers import AutoTokenizer

    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import reference_model

    tokenizer = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    model = reference_model(open_checkpoint(default_gguf))

    def reply(messages: list[dict], new_tokens: int = 24) -> str:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        tokens = transformers_greedy(model, list(ids), new_tokens)
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
        return tokenizer.decode(tokens, skip_special_tokens=True)

    return reply


def test_chat_through_a_pipe_replies_as_transformers_and_keeps_context(default_package, reference_chat):
    first = reference_chat([{"role": "user", "content": QUESTION}])
    second = reference_chat([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
                             {"role": "user", "content": FOLLOW_UP}])
    result = chat_cli(default_package, f"{QUESTION}\n{FOLLOW_UP}\n/reset\n{QUESTION}\n/exit\nnot read\n",
                      "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert first and second and first != second
    assert result.stdout == f"{first}\n{second}\n{first}\n"
    turns = [line for line in result.stderr.splitlines() if "prompt tokens run" in line]
    assert len(turns) == 3
    run = [int(line.split("; ")[1].split()[0]) for line in turns]
    cached = [int(line.split(", ")[-1].split()[0]) for line in turns]
    # the second turn ran only its own tokens (plus the end of the first reply the cache did not hold); after the
    # reset the first turn ran whole again
    assert run[1] < 25 and cached[1] > run[0] + 24 and run[2] == run[0]


def test_run_chat_is_one_turn_and_the_api_chats_alike(default_package, reference_chat):
    system = "You are a geography teacher."
    expected = reference_chat([{"role": "system", "content": system}, {"role": "user", "content": QUESTION}])
    result = run_cli("run", str(default_package), "--chat", "--system", system, "--prompt", QUESTION,
                     "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    model = llama_export.load(default_package)
    assert model.chat(QUESTION, system=system, max_new_tokens=24) == expected
    follow = model.chat(FOLLOW_UP, max_new_tokens=24)
    assert follow == reference_chat([{"role": "system", "content": system}, {"role": "user", "content": QUESTION},
                                     {"role": "assistant", "content": expected},
                                     {"role": "user", "content": FOLLOW_UP}])
    assert [m["role"] for m in model.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_chat_without_a_template_continues_raw_text(tiny_package):
    prompt = "Once upon a time"
    result = chat_cli(tiny_package, prompt + "\n", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "has no chat template" in result.stderr
    tokenizer = PackageTokenizer(tiny_package)
    package = OnnxPackage(tiny_package)
    tokens = [t for t in generate(package, tokenizer.encode(prompt), 8) if t not in package.eos_token_ids]
    assert result.stdout == tokenizer.decode(tokens) + "\n"


def test_chat_refuses_bad_input_in_one_line(tmp_path, tiny_package):
    result = chat_cli(tmp_path / "missing", "hello\n")
    assert result.returncode == 1 and "missing" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = chat_cli(tiny_package, "hello\n", "--temperature", "-1")
    assert result.returncode == 2 and "temperature" in result.stderr and "Traceback" not in result.stderr
    # a turn that cannot run is one line and the next turn is still read
    result = chat_cli(tiny_package, "hello\nworld\n", "--max-new-tokens", "600")
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 1 and len(errors) == 2 and all("context of 512" in line for line in errors)
    assert "Traceback" not in result.stderr
    assert run_cli("run", str(tiny_package), "--prompt", "x", "--system", "y").returncode == 2


@pytest.fixture(scope="module")
def tiny_package(tiny_models, tmp_path_factory) -> Path:
    """A tiny model exported through the Python API, the CLI's entry point made to fail if anything calls it."""
    import llama_export.exporter.cli as cli

    def no_cli(*args, **kwargs):
        raise AssertionError("the Python API called the CLI")

    saved = cli.main
    cli.main = no_cli
    try:
        result = llama_export.export(tiny_models["llama2-gqa"], "cpu", output=tmp_path_factory.mktemp("api") / "pkg")
    finally:
        cli.main = saved
    assert result.manifest["parity"]["passed"] and result.package.is_dir()
    summary = result.as_dict()
    assert [s["step"].split()[0] for s in summary["stages"]] == ["Opening", "Tracing", "Running", "Writing",
                                                                 "Verifying"]
    assert all(s["seconds"] >= 0 and s["peak_memory_gb"] > 0 for s in summary["stages"])
    assert summary["total_bytes"] == sum(p.stat().st_size for p in result.package.iterdir()
                                         if p.name != "manifest.json")
    return result.package


def test_python_api_exports_verifies_and_generates(tiny_package, tiny_models):
    verified = llama_export.verify(tiny_package)
    assert verified["passed"] and verified["exactness"]["max_abs_logit_diff"] < 1e-3
    model = llama_export.load(tiny_package)
    ids = model.tokenizer.encode("Once upon a time")
    expected = transformers_greedy(tiny_models["llama2-gqa"], ids, 10)
    if 2 in expected:  # the tiny model's end token stops generate()
        expected = expected[:expected.index(2)]
    assert model.generate("Once upon a time", max_new_tokens=10) == model.tokenizer.decode(expected)


def test_python_api_raises_typed_errors(tmp_path, tiny_package):
    with pytest.raises(llama_export.LlamaExportError, match="not found"):
        llama_export.export(tmp_path / "missing", "cpu", output=tmp_path / "out")
    with pytest.raises(llama_export.LlamaExportError, match="unknown option 'blocksize'"):
        llama_export.export(None, "cpu", blocksize=32)
    with pytest.raises(llama_export.LlamaExportError, match="unknown target"):
        llama_export.export(None, "gameboy")
    with pytest.raises(llama_export.LlamaExportError, match="not a llama-export package"):
        llama_export.verify(tmp_path)
    with pytest.raises(llama_export.LlamaExportError, match="temperature"):
        llama_export.load(tiny_package).generate("hi", temperature=-1)
    assert not list(tmp_path.iterdir())


def test_packages_carry_config_files_hugging_face_tools_read(default_package):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(default_package)
    genai = json.loads((default_package / "genai_config.json").read_text())["model"]
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == genai["decoder"]["num_hidden_layers"] == 30
    assert config.max_position_embeddings == genai["context_length"] == 8192
    generation = GenerationConfig.from_pretrained(default_package)
    assert generation.eos_token_id == genai["eos_token_id"] and not generation.do_sample
    assert generation.max_length == json.loads((default_package / "genai_config.json").read_text())["search"][
        "max_length"] == 4096
    tokenizer = AutoTokenizer.from_pretrained(default_package)
    assert tokenizer("The capital of France is")["input_ids"] == PackageTokenizer(default_package).encode(
        "The capital of France is")


OPTIMUM_PYTHON = os.environ.get("LLAMA_EXPORT_OPTIMUM_PYTHON")
OPTIMUM_SCRIPT = """
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
import torch
model = ORTModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([json.loads(sys.argv[2])])
out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[3]),
                     min_new_tokens=int(sys.argv[3]), do_sample=False)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"""


OPTIMUM_BATCH_SCRIPT = """
import sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
model = ORTModelForCausalLM.from_pretrained(sys.argv[1])
a, b = [5, 17, 33, 41, 9, 12, 80], [7, 19, 3]
pad = len(a) - len(b)
ids = torch.tensor([a, [0] * pad + b])
mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
for row, p in zip(out, (a, b)):
    t = torch.tensor([p])
    alone = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=10, min_new_tokens=10,
                           do_sample=False)
    print(row[len(a):].tolist() == alone[0, len(p):].tolist())
"""


@pytest.mark.skipif(not OPTIMUM_PYTHON, reason="set LLAMA_EXPORT_OPTIMUM_PYTHON to a Python with optimum-onnx "
                                               "installed (it pins transformers 4: a venv of its own)")
def test_optimum_opens_the_cpu_package_and_generates_transformers_tokens(default_package, default_gguf, tiny_models,
                                                                        tmp_path):
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import reference_model

    ids = PackageTokenizer(default_package).encode("Here is a short poem about the sea:\n")
    result = subprocess.run([OPTIMUM_PYTHON, "-c", OPTIMUM_SCRIPT, str(default_package), json.dumps(ids), "32"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert theirs == transformers_greedy(reference_model(open_checkpoint(default_gguf)), ids, 32)
    # --layout optimum: a left-padded batch through Optimum's generate gives each sequence's own tokens
    out = tmp_path / "optimum"
    assert run_cli("--model", str(tiny_models["llama2-gqa"]), "--layout", "optimum", "-o", str(out),
                   "-q").returncode == 0
    result = subprocess.run([OPTIMUM_PYTHON, "-c", OPTIMUM_BATCH_SCRIPT, str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_export_json_and_progress_lines(tiny_models, tmp_path):
    report = tmp_path / "result.json"
    result = run_cli("--model", str(tiny_models["llama3-gqa"]), "--precision", "int4", "--quant", "gptq",
                     "--output", str(tmp_path / "pkg"), "--json", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert Path(data["package"]) == (tmp_path / "pkg").resolve() and data["parity"]["passed"]
    assert data["files"]["model.onnx.data"] > 0 and data["peak_memory_gb"] > 0 and len(data["stages"]) == 5
    lines = result.stderr.splitlines()
    # not a terminal: plain lines with the count, the rate and the time left
    assert any("calibrated layer 1/2" in line and "layer/s" in line and "left" in line for line in lines)
    assert any("weights written" in line and "tensor/s" in line for line in lines)
    quiet = run_cli("--model", str(tiny_models["llama3-gqa"]), "--output", str(tmp_path / "q"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.strip() == str(tmp_path / "q")
    refused = run_cli("--model", str(tiny_models["llama3-gqa"]), "--output", str(tmp_path / "r"), "--json",
                      str(tmp_path / "no" / "r.json"))
    assert refused.returncode == 1 and "does not exist" in refused.stderr and not (tmp_path / "r").exists()


def test_progress_bar_on_a_terminal():
    from llama_export.exporter.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    count = Progress(1, stream=stream).counter("weights written", "tensor")
    for done in range(1, 41):
        count(done, 40)
    drawn = stream.getvalue()
    assert "weights written" in drawn and "40/40" in drawn and "tensor/s" in drawn and "\r" in drawn
    assert "<" in drawn  # tqdm's elapsed<left


def test_verify_plot_writes_a_png(tiny_package, tmp_path):
    plot = tmp_path / "parity.png"
    result = run_cli("verify", str(tiny_package), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    import matplotlib.image

    image = matplotlib.image.imread(str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # drawn, not blank


def test_bench_tables_are_drawn_as_charts(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    from bench._common import report_table

    chart = tmp_path / "table.png"
    report_table("decode speed", ["package", "decode tok/s", "size MB", "vs fp32"],
                 [["ours", "41.2", "98", "+3.1%"], ["theirs", "38.0", "102", "-"]], chart)
    text = capsys.readouterr().out.splitlines()
    assert text[1] == "decode speed"
    assert text[2:] == ["package  decode tok/s  size MB  vs fp32", "ours             41.2       98    +3.1%",
                        "theirs           38.0      102        -"]
    import matplotlib.image

    assert matplotlib.image.imread(str(chart)).shape[0] > 300


def padded_batch_logits(package: Path, sequences: list[list[int]]):
    """Logits of every real position of each sequence, run as one left-padded batch and one by one, by ONNX
    Runtime fed as Optimum feeds it (position_ids from the mask where the graph takes them)."""
    import numpy as np

    runner = OnnxPackage(package)
    longest = max(len(s) for s in sequences)

    def run(rows):
        width = max(len(r) for r in rows)
        ids = np.array([[0] * (width - len(r)) + r for r in rows], np.int64)
        mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
        positions = np.maximum(mask.cumsum(-1) - 1, 0)
        logits, _ = runner.forward(ids, mask, positions, runner.empty_cache(len(rows)))
        return [logits[i, width - len(r):] for i, r in enumerate(rows)]

    assert longest > min(len(s) for s in sequences)
    return run(sequences), [run([s])[0] for s in sequences]


def test_optimum_layout_runs_left_padded_batches(tiny_models, tmp_path):
    import numpy as np
    import onnx

    sequences = [[5, 17, 33, 41, 9, 12, 80], [7, 19, 3]]
    out = tmp_path / "optimum"
    result = run_cli("--model", str(tiny_models["llama2-gqa"]), "--layout", "optimum", "--output", str(out), "-q")
    assert result.returncode == 0, result.stderr
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert "position_ids" in [i.name for i in graph.input]
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.node)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "optimum" and manifest["parity"]["passed"]
    batched, alone = padded_batch_logits(out, sequences)
    for ours, single in zip(batched, alone):
        assert np.abs(ours - single).max() < 1e-4
    # the default layout's GroupQueryAttention reads a left-padded row wrongly: why the layout exists
    default = tmp_path / "genai"
    assert run_cli("--model", str(tiny_models["llama2-gqa"]), "--output", str(default), "-q",
                   "--no-verify").returncode == 0
    batched, alone = padded_batch_logits(default, sequences)
    assert np.abs(batched[1] - alone[1]).max() > 1e-2 and np.abs(batched[0] - alone[0]).max() < 1e-4
    refused = run_cli("--model", str(tiny_models["llama2-gqa"]), "--layout", "optimum", "--target", "jetson-orin",
                      "--output", str(tmp_path / "x"))
    assert refused.returncode == 1 and "--layout optimum is for --target cpu" in refused.stderr


def test_generation_config_end_tokens_reach_the_package(tiny_models, tmp_path):
    """An instruction model's end-of-turn token listed only in generation_config.json (LLaMA 3 Instruct's
    <|eot_id|>) is one the package stops on."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama2-gqa"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    out = tmp_path / "pkg"
    result = run_cli("--model", str(folder), "--output", str(out), "--no-verify", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"] == [2, 7]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    assert OnnxPackage(out).eos_token_ids == {2, 7}
