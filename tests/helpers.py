"""What the tests share besides fixtures: tiny random LLaMA models of each generation's shape and their tokenizer,
tiny GGUF files, greedy decoding by transformers and by onnxruntime-genai, and running the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The llama-export command as a user runs it (a fresh process, from the repository root)."""
    return subprocess.run([sys.executable, "-m", "llama_export", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Each LLaMA generation's distinguishing shape.
VARIANTS = {
    "llama1-mha": dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama2-gqa": dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3-gqa": dict(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3.1-rope-scaling": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "codellama-theta-1e6": dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "llama3.2-tied": dict(num_key_value_heads=2, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}

CORPUS = ("The quick brown fox jumps over the lazy dog. Once upon a time there was a small village by a river. "
          "def add(a, b):\n    return a + b\n") * 20


def tiny_config(variant: str, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{"tie_word_embeddings": False, **TINY, **VARIANTS[variant], **overrides})


def write_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([CORPUS], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "model_max_length": 512}))


def make_hf_model(folder: Path, variant: str, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(variant, **overrides)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    write_tiny_tokenizer(folder, TINY["vocab_size"])
    return folder


def transformers_greedy(folder_or_model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' own generate(), greedy, with its own KV cache: an independent reference."""
    from transformers import LlamaForCausalLM

    model = folder_or_model
    if isinstance(folder_or_model, Path):
        model = LlamaForCausalLM.from_pretrained(folder_or_model, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def genai_greedy(folder: Path, prompt_ids: list[int], new_tokens: int, model=None, adapter=None) -> list[int]:
    """Greedy tokens from onnxruntime-genai on the package folder (it stops early at an end token); `model` an
    og.Model already open, `adapter` (og.Adapters, name) one to make active."""
    import onnxruntime_genai as og

    model = model or og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)
    generator.append_tokens(prompt_ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion order for Q/K rows (the inverse of what the GGUF source undoes)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# The float16 fields of llama.cpp's K-quant blocks (byte offset, typical value): d (and dmin) sized so that the
# weights come out with about a tiny model's spread.
K_QUANT_FIELDS = {"Q4_K": ((0, 2e-4), (2, 1e-3)), "Q5_K": ((0, 1e-4), (2, 1e-3)), "Q6_K": ((208, 3e-5),)}
K_QUANT_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def random_blocks(rows: int, columns: int, kind: str, rng) -> np.ndarray:
    """Raw K-quant blocks [rows, bytes]: random codes, scales and minimums, finite positive d and dmin."""
    raw = rng.integers(0, 256, (rows * columns // 256, K_QUANT_BYTES[kind]), dtype=np.uint8)
    for offset, typical in K_QUANT_FIELDS[kind]:
        values = (typical * rng.uniform(0.5, 1.5, (len(raw), 1))).astype(np.float16)
        raw[:, offset:offset + 2] = values.view(np.uint8)
    return raw.reshape(rows, -1)


def gguf_writer(path: Path, architecture: str, config, feed_forward: int):
    """A GGUF writer holding the sizes every LLaMA-family file has, as llama.cpp's converter writes them."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    return writer


def write_tiny_gguf(path: Path, variant: str = "llama2-gqa", seed: int = 0, matrix_type: str = "Q8_0",
                    embedding_type: str = "Q8_0", types: dict[str, str] | None = None,
                    arrays: dict[str, list] | None = None, **overrides) -> dict[str, np.ndarray]:
    """A GGUF as llama.cpp's converter writes it (quantized matrices, permuted Q/K); returns the HF tensors.
    `types` overrides the format of single tensors, by GGUF name (gguf's Python package cannot write K-quants:
    those tensors get random blocks, see random_blocks); `arrays` adds metadata arrays; `overrides` change
    the config."""
    import gguf
    from transformers import LlamaForCausalLM

    config = tiny_config(variant, **overrides)
    torch.manual_seed(seed)
    state = {k: v.numpy() for k, v in LlamaForCausalLM(config).state_dict().items()}
    writer = gguf_writer(path, "llama", config, config.intermediate_size)
    for key, values in (arrays or {}).items():
        writer.add_array(key, values)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in state.items():
        if name in names:
            gguf_name = names[name]
        else:
            layer, part = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gguf_name = f"blk.{layer}.{parts[part]}.weight"
        if "q_proj" in name:
            tensor = permute_rows(tensor, config.num_attention_heads)
        elif "k_proj" in name:
            tensor = permute_rows(tensor, config.num_key_value_heads)
        if tensor.ndim == 2:
            default = embedding_type if gguf_name == "token_embd.weight" else matrix_type
            kind = gguf.GGMLQuantizationType[(types or {}).get(gguf_name, default)]
            if kind.name in K_QUANT_FIELDS:
                data = random_blocks(*tensor.shape, kind.name, np.random.default_rng(seed + len(state)))
            else:
                data = gguf.quants.quantize(tensor, kind)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, tensor.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def unsorted_nodes(graph) -> list[str]:
    """Nodes (of an onnx_ir graph) that read a value no earlier node, graph input or initializer made: ONNX
    requires topological order, and tools other than ONNX Runtime (onnx.checker, parsers) reject a graph without."""
    known = {v.name for v in graph.inputs} | set(graph.initializers) | {""}
    unsorted = []
    for node in graph:
        if any(v is not None and v.name not in known for v in node.inputs):
            unsorted.append(node.name)
        known |= {v.name for v in node.outputs}
    return unsorted


# Meta's names for transformers' (the inverse of exporter/sources/meta.py), with the dimension model parallelism
# splits: 0 column-parallel, 1 row-parallel, None whole in every shard.
META_LAYER = {"self_attn.q_proj": ("attention.wq", 0), "self_attn.k_proj": ("attention.wk", 0),
              "self_attn.v_proj": ("attention.wv", 0), "self_attn.o_proj": ("attention.wo", 1),
              "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.down_proj": ("feed_forward.w2", 1),
              "mlp.up_proj": ("feed_forward.w3", 0), "input_layernorm": ("attention_norm", None),
              "post_attention_layernorm": ("ffn_norm", None)}


def write_meta_checkpoint(folder: Path, state: dict, config, shards: int, vocab_parallel: bool,
                          dtype=torch.bfloat16, **params) -> Path:
    """A transformers LLaMA state dict in Meta's layout: params.json and consolidated.NN.pth shards (Q/K rows
    interleaved per head, matrices split as Meta's model parallelism splits them; the embedding on the vocabulary
    when `vocab_parallel` (LLaMA 3), else on the model dimension (LLaMA 1/2))."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to(dtype)
        parts = name.removesuffix(".weight").split(".")
        if name == "model.embed_tokens.weight":
            meta["tok_embeddings.weight"] = (tensor, 0 if vocab_parallel else 1)
        elif name == "model.norm.weight":
            meta["norm.weight"] = (tensor, None)
        elif name == "lm_head.weight":
            meta["output.weight"] = (tensor, 0)
        else:
            meta_name, dim = META_LAYER[".".join(parts[3:])]
            heads = {"self_attn.q_proj": config.num_attention_heads,
                     "self_attn.k_proj": config.num_key_value_heads}.get(".".join(parts[3:]))
            if heads:
                tensor = torch.from_numpy(permute_rows(tensor.float().numpy(), heads)).to(dtype)
            meta[f"layers.{parts[2]}.{meta_name}.weight"] = (tensor, dim)
    for index in range(shards):
        shard = {name: (tensor if dim is None else tensor.chunk(shards, dim)[index]).clone()
                 for name, (tensor, dim) in meta.items()}
        torch.save(shard, folder / f"consolidated.{index:02d}.pth")
    (folder / "params.json").write_text(json.dumps({
        "dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads, "norm_eps": config.rms_norm_eps, **params}))
    return folder


def byte_level_bytes(token: str) -> bytes:
    """A byte-level BPE token's bytes (GPT-2's printable stand-ins mapped back)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    return bytes(decoder[char] for char in token)


def write_tiktoken_file(path: Path, merges: list, count: int) -> dict[bytes, int]:
    """tiktoken's base64-rank file of `count` ranks: the 256 bytes, then byte-level BPE merges in order."""
    import base64

    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = byte_level_bytes(left) + byte_level_bytes(right)
        if len(ranks) == count:
            break
        ranks.setdefault(token, len(ranks))
    assert len(ranks) == count, f"only {len(ranks)} ranks"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def corpus_merges(vocab_size: int) -> list:
    """Byte-level BPE merges learned from CORPUS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([CORPUS], trainer)
    return json.loads(tokenizer.to_str())["model"]["merges"]
