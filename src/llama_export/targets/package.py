"""Writing package folders: the model, its genai_config.json and manifest (staging and the swap into place:
staging.py)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from llama_export import names
from llama_export.families import family_of
from llama_export.targets.staging import MANIFEST, TOOL, check_output, is_package, output_lock, staged_package  # noqa: F401

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# onnx-ir writes weights concurrently up to this many bytes; one tensor at a time keeps export memory flat.
_IN_FLIGHT_BYTES = 64 << 20
DEFAULT_MAX_LENGTH = 4096  # genai's search max_length; the full context would allocate huge KV buffers


def save_model(model: ir.Model, folder: Path, progress=None) -> None:
    """model.onnx plus one external-data file; lazy weights are read and written one at a time."""
    def callback(tensor, info) -> None:
        if progress:
            progress(info.index + 1, info.total)

    ir.save(model, folder / MODEL_FILE, external_data=DATA_FILE, max_workers=1,
            max_in_flight_bytes=_IN_FLIGHT_BYTES, callback=callback)


def io_dims(model: ir.Model) -> dict:
    """Names, element types and dims (symbolic ones by name) of the graph's inputs and outputs; inputs with a
    default (a runtime adapter's, passes/lora_inputs.py) are left out: nothing has to feed them."""

    def describe(values):
        return {
            v.name: {"dtype": v.dtype.name.lower() if v.dtype else None,
                     "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])]}
            for v in values
        }

    return {"inputs": describe(v for v in model.graph.inputs if not v.is_initializer()),
            "outputs": describe(model.graph.outputs)}


def genai_config(model: ir.Model, config, max_length: int | None = None, filename: str = MODEL_FILE,
                 threads: int | None = None) -> dict:
    """onnxruntime-genai's genai_config.json for a decoder-only llama package, matching the graph: position_ids only
    if it is an input, past and present sharing one buffer when GroupQueryAttention handles the cache; `threads`
    sets the session's intra-op threads (None: genai's default)."""
    position_ids = names.POSITION_IDS in {v.name for v in model.graph.inputs}
    past_present_share_buffer = any(n.op_type == "GroupQueryAttention" for n in model.graph)
    context_length = config.max_position_embeddings
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eos = config.eos_token_id
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    **({"intra_op_num_threads": threads} if threads is not None else {})},
                "filename": filename,
                "head_size": head_size,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": names.INPUT_IDS,
                    "attention_mask": names.ATTENTION_MASK,
                    **({"position_ids": names.POSITION_IDS} if position_ids else {}),
                    "past_key_names": names.PAST_KEY,
                    "past_value_names": names.PAST_VALUE,
                },
                "outputs": {
                    "logits": names.LOGITS,
                    "present_key_names": names.PRESENT_KEY,
                    "present_value_names": names.PRESENT_VALUE,
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad_token(config),
            "type": family_of(config).genai_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length or min(context_length, DEFAULT_MAX_LENGTH),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": past_present_share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def hf_config(config, architecture: str) -> dict:
    """config.json for Hugging Face tools (transformers' AutoConfig and tokenizer loaders, Optimum's
    ORTModelForCausalLM): the source's config, its cache in use (the package's --context is generation_config's
    max_length)."""
    data = config.to_diff_dict()
    data.update(architectures=[architecture], use_cache=True)
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope:  # where transformers 4 reads it
        data.setdefault("rope_theta", rope["rope_theta"])
    data.pop("quantization_config", None)  # the package's own precision is in manifest.json
    return data


def generation_config(config, context: int) -> dict:
    """generation_config.json: the end and padding tokens, greedy by default as `llama-export run` is."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": pad_token(config),
            "do_sample": False, "max_length": context}


def pad_token(config) -> int | None:
    """The config's padding token, else its (first) end token."""
    eos = config.eos_token_id
    return config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
