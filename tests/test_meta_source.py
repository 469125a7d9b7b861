"""Meta's original checkpoints (params.json, consolidated.NN.pth, tokenizer.model): tiny copies of transformers
models in Meta's layout (1 and 2 model-parallel shards, LLaMA 2 and LLaMA 3 style), a Meta copy of the default
model, and pickles that would run code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    CORPUS,
    REPO,
    corpus_merges,
    genai_greedy,
    make_hf_model,
    run_cli,
    transformers_greedy,
    write_meta_checkpoint,
    write_tiktoken_file,
)

from llama_export.exporter.cli import main
from llama_export.exporter.sources import open_checkpoint
from llama_export.runtimes import OnnxPackage

TEXTS = [CORPUS[:400], "Hello   world!!\n\n  x 1234567 it's 'LL \t tabs É ü 你好 🙂", "<|eot_id|> after a special",
         " leading space", ""]

# The two styles: LLaMA 2 (SentencePiece, embedding split on the model dimension) and LLaMA 3 (tiktoken, embedding
# split on the vocabulary, 256 special tokens after the ranks).
STYLES = {
    "llama2": dict(variant="llama2-gqa", vocab_size=400, vocab_parallel=False, params=dict(vocab_size=-1)),
    "llama3": dict(variant="llama3-gqa", vocab_size=576, vocab_parallel=True,
                   params=dict(vocab_size=576, rope_theta=500000.0)),
}


def train_sentencepiece(path, vocab_size: int) -> None:
    """A LLaMA-2-style SentencePiece BPE model (byte fallback, digits split, dummy prefix) trained on CORPUS."""
    import sentencepiece

    corpus = path.with_suffix(".txt")
    corpus.write_text(CORPUS + "Hello world! x 1234567 it's É ü 你好\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.with_suffix(".model").rename(path)


def make_meta_copy(root, style: str, shards: int):
    """A tiny transformers model (bf16-exact weights) and its copy in Meta's layout."""
    from transformers import LlamaForCausalLM

    spec = STYLES[style]
    hf = make_hf_model(root / "hf", spec["variant"], vocab_size=spec["vocab_size"])
    model = LlamaForCausalLM.from_pretrained(hf).to(torch.bfloat16).float()  # Meta ships bf16
    model.save_pretrained(hf)
    meta = write_meta_checkpoint(root / "meta", model.state_dict(), model.config, shards, spec["vocab_parallel"],
                                 multiple_of=32, ffn_dim_multiplier=0.75, **spec["params"])
    if style == "llama2":
        train_sentencepiece(meta / "tokenizer.model", spec["vocab_size"])
    else:
        write_tiktoken_file(meta / "tokenizer.model", corpus_merges(600), spec["vocab_size"] - 256)
    return hf, meta


def without_bos(ids, bos: int) -> list[int]:
    """onnxruntime-genai's encode here leaves the BOS out (it reads add_bos_token, then adds it only through a chat
    template), so its tokens are compared after it."""
    ids = [int(i) for i in ids]
    return ids[1:] if ids[:1] == [bos] else ids


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("shards", [1, 2])
def test_meta_tensors_equal_transformers(tmp_path, style, shards):
    """Every parameter read from the shards (joined, Q/K rows un-interleaved) equals transformers' original, whole
    and by rows; the config from params.json is the original's."""
    hf, meta = make_meta_copy(tmp_path, style, shards)
    ours, original = open_checkpoint(meta), open_checkpoint(hf)
    assert ours.kind == "meta" and set(ours.weights) == set(original.weights)
    for name, info in original.weights.items():
        expected = info.load()
        assert np.array_equal(ours.weight(name).load(), expected), name
        assert np.array_equal(ours.weight(name).rows(3, 9), expected[3:9]), name
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(ours.config, field) == getattr(original.config, field), field
    assert ours.config.rope_parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]


def test_llama2_style_two_shards_export_matches_transformers(tmp_path):
    """SentencePiece tokenizer, embedding split on the model dimension: the cpu package's logits and greedy tokens
    equal transformers' on the original, and its tokenizer encodes as SentencePiece does (after a BOS, as Meta's
    generation code adds)."""
    import onnxruntime_genai as og
    import sentencepiece
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    hf, meta = make_meta_copy(tmp_path, "llama2", 2)
    package = tmp_path / "package"
    assert main(["--model", str(meta), "--precision", "fp32", "--output", str(package), "--quiet"]) == 0
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "meta" and manifest["parity"]["passed"]
    prompt = [1, 17, 42, 99, 5, 250]
    assert genai_greedy(package, prompt, 16) == transformers_greedy(hf, prompt, 16)
    ids = np.array([prompt], dtype=np.int64)
    onnx_package = OnnxPackage(package)
    logits, _ = onnx_package.forward(ids, np.ones_like(ids), np.arange(6)[None], onnx_package.empty_cache(1))
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(hf).eval()(torch.tensor(ids)).logits.numpy()
    assert np.max(np.abs(logits - expected)) <= 1e-4

    sp = sentencepiece.SentencePieceProcessor(model_file=str(meta / "tokenizer.model"))
    tokenizer, runtime = Tokenizer.from_file(str(package / "tokenizer.json")), og.Tokenizer(og.Model(str(package)))
    for text in TEXTS:
        expected_ids = [sp.bos_id()] + sp.encode(text)
        assert tokenizer.encode(text).ids == expected_ids, text
        assert without_bos(runtime.encode(text), sp.bos_id()) == expected_ids[1:], text


def test_meta_copy_of_default_model(tmp_path, default_gguf):
    """The default model (the HF original: transformers' model of the GGUF, bf16-exact) copied into Meta's layout,
    2 shards with a tiktoken tokenizer.model (256 bytes then SmolLM2's merges, LLaMA 3's 256 special tokens after):
    it exports, verifies (against its own source, then `verify --reference` the HF original), its greedy tokens
    equal transformers' on the original, and its tokenizer encodes text as tiktoken does with that file and LLaMA
    3's split pattern."""
    import onnxruntime_genai as og
    import tiktoken
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llama_export.exporter.sources.meta_tokenizer import LLAMA3_PATTERN, llama3_special_tokens

    original = LlamaForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    with torch.no_grad():  # bf16-exact, as Meta's copy will be (the GGUF-loaded model refuses .to())
        for parameter in original.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    original.eval()
    config = original.config
    state = dict(original.state_dict())
    if config.tie_word_embeddings:  # Meta's files hold the output matrix even where it is tied (LLaMA 3.2)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    meta = write_meta_checkpoint(tmp_path / "meta", state, config, 2, True, vocab_size=config.vocab_size,
                                 multiple_of=256, rope_theta=config.rope_parameters["rope_theta"],
                                 norm_eps=config.rms_norm_eps)
    merges = json.loads(AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
                        .backend_tokenizer.to_str())["model"]["merges"]
    ranks = write_tiktoken_file(meta / "tokenizer.model", merges, config.vocab_size - 256)

    package = tmp_path / "package"
    assert main(["--model", str(meta), "--precision", "fp32", "--output", str(package), "--verify-tokens", "8",
                 "--quiet"]) == 0
    parity = json.loads((package / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3
    prompt = [1, 504, 3458, 282, 4649, 314, 253, 1345]
    assert genai_greedy(package, prompt, 20) == transformers_greedy(original, prompt, 20)
    # `verify` with the HF original as its reference, saved as a Hugging Face folder (a GGUF-loaded model will not
    # save itself)
    settings = {key: value for key, value in config.to_dict().items() if key != "quantization_config"}
    saved = LlamaForCausalLM(LlamaConfig(**settings))
    saved.load_state_dict(original.state_dict())
    saved.save_pretrained(tmp_path / "hf-original")
    result = run_cli("verify", str(package), "--reference", str(tmp_path / "hf-original"), "--tokens", "8")
    assert result.returncode == 0, result.stdout + result.stderr

    special = llama3_special_tokens(False)
    encoding = tiktoken.Encoding("meta-copy", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={name: len(ranks) + i for i, name in enumerate(special)})
    bos = len(ranks)
    tokenizer, runtime = Tokenizer.from_file(str(package / "tokenizer.json")), og.Tokenizer(og.Model(str(package)))
    for text in TEXTS + [(REPO / "README.md").read_text()[:3000]]:
        expected = [bos] + encoding.encode(text, allowed_special="all")
        assert tokenizer.encode(text).ids == expected, text[:40]
        assert without_bos(runtime.encode(text), bos) == expected[1:], text[:40]


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    """A shard whose pickle would call os.system: one line naming the file and the call, exit 1, and the command
    never ran (its marker file is absent)."""
    hf, meta = make_meta_copy(tmp_path, "llama3", 2)
    marker = tmp_path / "code-ran"
    shard = torch.load(meta / "consolidated.01.pth", weights_only=True)
    shard["payload"] = RunsCode(marker)
    torch.save(shard, meta / "consolidated.01.pth")
    result = run_cli("--model", str(meta), "--output", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "consolidated.01.pth" in lines[0] and "refused" in lines[0] and "system" in lines[0], lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the same file through Python's own pickle does run the command: the test's payload is live
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(meta / 'consolidated.01.pth')!r}, "
                    "weights_only=False)"], cwd=tmp_path, check=False, capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda m: (m / "params.json").write_text('{"dim": 64, "n_layers": 2}'), "'n_heads' is None"),
    (lambda m: (m / "consolidated.01.pth").rename(m / "consolidated.02.pth"), "a shard is missing"),
    (lambda m: (m / "consolidated.00.pth").write_bytes((m / "consolidated.00.pth").read_bytes()[:5000]),
     "not a readable PyTorch checkpoint"),
    (lambda m: (m / "tokenizer.model").write_text("bm90IGJhc2U2NA== 0\nbm90IGJhc2U2NA== 1\n"),
     "repeats a token"),
    (lambda m: (m / "params.json").write_text(json.dumps({**json.loads((m / "params.json").read_text()),
                                                          "multiple_of": 48})), "the config implies"),
])
def test_bad_meta_folders_are_refused_in_one_line(tmp_path, change, message):
    _, meta = make_meta_copy(tmp_path, "llama3", 2)
    change(meta)
    result = run_cli("--model", str(meta), "--output", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
