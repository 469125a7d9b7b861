"""llama.cpp GGUF files of a registered family's architecture (llama_export.families: llama): metadata becomes the
family's config, tensor names map through the family's table, tensors are dequantized one at a time on demand, and
the tokenizer is rebuilt from the metadata into tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llama_export.exporter.errors import UserError
from llama_export.exporter.sources.base import (
    Checkpoint,
    WeightInfo,
    check_llama_config,
    check_sizes,
    check_weights_match_config,
    require_finite,
    unpermute_rows,
)
from llama_export.exporter.sources.gguf_blocks import FORMATS as BLOCK_FORMATS
from llama_export.exporter.sources.gguf_blocks import decode_rows


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _family(reader, path: Path):
    from llama_export.families import UnsupportedFamily, family_for_gguf

    try:
        return family_for_gguf(_field(reader, "general.architecture"))
    except UnsupportedFamily as exc:
        raise UserError(f"{path}: {exc}") from None


def _config_from_metadata(reader, path: Path, family):
    arch = family.gguf_architecture
    p = f"{arch}."
    try:
        hidden = int(_field(reader, p + "embedding_length"))
        heads = int(_field(reader, p + "attention.head_count"))
        kv_heads = int(_field(reader, p + "attention.head_count_kv", heads))
        layers = int(_field(reader, p + "block_count"))
        intermediate = int(_field(reader, p + "feed_forward_length"))
        tokens = _field(reader, "tokenizer.ggml.tokens") or []
        vocab = int(_field(reader, p + "vocab_size", len(tokens)))
        head_dim = int(_field(reader, p + "attention.key_length", hidden // heads if heads > 0 else 0))
    except (TypeError, ValueError):
        raise UserError(f"{path}: GGUF metadata lacks the model dimensions (or holds them as something other "
                        "than whole numbers)") from None
    rope = {"rope_type": "default", "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0))}
    scaling = _field(reader, p + "rope.scaling.type")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(_field(reader, p + "rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise UserError(f"{path}: GGUF rope scaling '{scaling}' is not supported; export the Hugging Face folder")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise UserError(
            f"{path}: GGUF with precomputed rope frequencies (LLaMA-3.1 style) is not supported yet; "
            "export the Hugging Face folder instead"
        )
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    check_sizes(dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     num_hidden_layers=layers, intermediate_size=intermediate, vocab_size=vocab, head_dim=head_dim),
                path)
    try:
        extra = family.gguf_config(lambda key, default=None: _field(reader, key, default), p)
    except (TypeError, ValueError):
        raise UserError(f"{path}: GGUF metadata lacks the {arch} sizes (or holds them as something other than "
                        "whole numbers)") from None
    try:
        return family.config_type()(**{
            **dict(vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
            rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_parameters=rope,
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=eos,
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", eos)), **extra})
    except Exception as exc:  # transformers' config validation (several error types) on the file's values
        cause = exc.__cause__ or exc
        raise UserError(f"{path}: GGUF metadata does not make a LLaMA config ({cause})") from None


def _tensor_loader(tensor, n_heads: int | None, path: Path):
    def load() -> np.ndarray:
        from gguf import dequantize

        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        values = values.reshape(tuple(reversed([int(d) for d in tensor.shape])))
        require_finite(values, tensor.name, path)
        return unpermute_rows(values, n_heads) if n_heads else values

    return load


def _expert_stack(name: str, tensors: list, path: Path) -> WeightInfo:
    """A 3-D expert parameter ([experts, in, out]) from the GGUF tensors llama.cpp split it into ([experts, out_i,
    in] each), joined along their outputs; `rows(e0, e1)` dequantizes those experts alone."""
    if any(t is None for t in tensors):
        raise UserError(f"{path}: the experts of '{name}' are missing a part; the file is incomplete")
    shapes = [tuple(reversed([int(d) for d in t.shape])) for t in tensors]
    if any(len(s) != 3 for s in shapes) or len({(s[0], s[2]) for s in shapes}) != 1:
        raise UserError(f"{path}: the expert tensors of '{name}' have shapes {shapes}, not [experts, out, in] "
                        "stacks of one size")
    experts, _, columns = shapes[0]

    def rows(start: int, stop: int) -> np.ndarray:
        from gguf import dequantize

        parts = []
        for tensor, shape in zip(tensors, shapes):
            values = dequantize(tensor.data[start:stop], tensor.tensor_type).astype(np.float32, copy=False)
            parts.append(require_finite(values.reshape(stop - start, shape[1], columns), tensor.name, path))
        return np.ascontiguousarray(np.concatenate(parts, axis=1).transpose(0, 2, 1))

    shape = (experts, columns, sum(s[1] for s in shapes))
    return WeightInfo(shape=shape, load=lambda: rows(0, experts), load_rows=rows)


def _rows_loader(tensor, path: Path):
    """Rows of a tensor stored row by row (every GGUF type: a row is whole blocks)."""
    def load_rows(start: int, stop: int) -> np.ndarray:
        from gguf import dequantize

        columns = int(tensor.shape[0])
        values = dequantize(np.asarray(tensor.data)[start:stop], tensor.tensor_type).astype(np.float32, copy=False)
        return require_finite(values.reshape(-1, columns), tensor.name, path)

    return load_rows


def _quantized_loader(tensor, n_heads: int | None, path: Path):
    """The tensor's own blocks as codes, scales and minimums (exporter/sources/gguf_blocks.py; None for formats
    that are not carried over)."""
    kind = tensor.tensor_type.name
    if kind not in BLOCK_FORMATS:
        return None
    fmt = BLOCK_FORMATS[kind]

    def load():
        from llama_export.passes.block_quantized import BlockQuantized

        rows = int(np.prod([int(d) for d in tensor.shape[1:]]))
        codes, scales, minimums = decode_rows(tensor.data, rows, kind)
        require_finite(scales, tensor.name, path)
        if minimums is not None:
            require_finite(minimums, tensor.name, path)
        if n_heads:
            codes, scales = unpermute_rows(codes, n_heads), unpermute_rows(scales, n_heads)
            minimums = None if minimums is None else unpermute_rows(minimums, n_heads)
        return BlockQuantized(codes, scales, None, fmt.bits, fmt.sub_block, minimums=minimums,
                              half_params=fmt.half_params)

    return load


def _open_reader(path: Path):
    from gguf import GGUFReader

    from llama_export.exporter.sources.gguf_layout import check_gguf_layout

    check_gguf_layout(path)
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct errors, or numpy errors on bad files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable GGUF file: truncated or corrupt ({detail})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise UserError(f"{path}: truncated GGUF file (tensor {tensor.name} ends past the end of the file)")
    return reader


def open_gguf(path: Path) -> Checkpoint:
    reader = _open_reader(path)
    family = _family(reader, path)
    config = _config_from_metadata(reader, path, family)
    check_llama_config(config, path)
    weights: dict[str, WeightInfo] = {}
    stacked = {gguf: parameter for parameter, parts in family.gguf_expert_stacks.items() for gguf in parts}
    expert_parts: dict[str, dict[str, object]] = {}  # blk.N.<parameter> -> GGUF part name -> tensor
    for tensor in reader.tensors:
        layer, _, part = tensor.name.removeprefix("blk.").partition(".")
        part = part.removesuffix(".weight")
        if tensor.name.startswith("blk.") and part in stacked:
            expert_parts.setdefault(f"model.layers.{layer}.{stacked[part]}", {})[part] = tensor
            continue
        name = family.hf_name(tensor.name)
        if name is None:
            continue
        n_heads = family.permuted_heads(name, config)
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        fmt = BLOCK_FORMATS.get(tensor.tensor_type.name)
        weights[name] = WeightInfo(shape=shape, load=_tensor_loader(tensor, n_heads, path),
                                   load_quantized=_quantized_loader(tensor, n_heads, path),
                                   quantized_bits=fmt.bits if fmt else None,
                                   quantized_block_size=fmt.sub_block if fmt else 32,
                                   quantized_minimums=bool(fmt and fmt.minimums),
                                   quantized_half_params=bool(fmt and fmt.half_params),
                                   load_rows=None if n_heads or len(shape) != 2 else _rows_loader(tensor, path))

    for name, parts in expert_parts.items():
        weights[name] = _expert_stack(name, [parts.get(p) for p in family.gguf_expert_stacks[name.split(".", 3)[3]]],
                                      path)

    def write_tokenizer(dest: Path) -> list[str]:
        return write_gguf_tokenizer(path, reader, config, dest)

    checkpoint = Checkpoint(name=path.stem, kind="gguf", path=path, config=config, weights=weights, files=[path],
                            write_tokenizer=write_tokenizer)
    check_weights_match_config(checkpoint)
    return checkpoint


def _tokenizer_only(reader, folder: Path) -> Path:
    """A GGUF file in `folder` holding the tokenizer metadata of `reader`'s file, architecture llama, no tensors."""
    from gguf import GGUFValueType, GGUFWriter

    path = folder / "tokenizer.gguf"
    writer = GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf_tokenizer(path: Path, reader, config, dest: Path) -> list[str]:
    """tokenizer.json through transformers' GGUF converter; tokenizer_config.json written from the metadata
    so it names a tokenizer class that onnxruntime-genai's loader knows."""
    import tempfile

    from transformers import AutoTokenizer

    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        # transformers' GGUF reader takes the architectures it converts models of; the tokenizer alone does not
        # depend on one, so it is read from a copy of the tokenizer metadata under LLaMA's
        source = path if _field(reader, "general.architecture") == "llama" else _tokenizer_only(reader, Path(tmp))
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        except Exception as exc:
            raise UserError(f"{path}: cannot rebuild the tokenizer from GGUF metadata ({exc})") from None
        tokenizer.save_pretrained(tmp)
        (dest / "tokenizer.json").write_bytes((Path(tmp) / "tokenizer.json").read_bytes())
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def token(key):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer" if model == "llama" else "GPT2Tokenizer",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", model == "llama")),
        "add_eos_token": False,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
