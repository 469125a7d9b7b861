"""Trace a LLaMA model from transformers into ONNX without ever loading its weights.

The model is built on the meta device and given uninitialized storage (never touched, so it costs no resident
memory); the exporter sees the real graph, and every weight initializer is then bound to a lazy tensor that
reads the checkpoint when the package is written."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import torch

from llama_export import names
from llama_export.exporter.errors import UserError
from llama_export.exporter.sources import Checkpoint
from llama_export.names import FROM_CACHE, ROW_READER, SOURCE_NAMES
from llama_export.passes.streamed import RowStreamedTensor

OPSET = 23
UNBOUND = "unbound-weights"  # where the traced graph's parameters point until they are bound to the checkpoint
# Example sizes for tracing; each dynamic dimension gets a value above 1 so none is specialized away.
_BATCH, _SEQ, _PAST = 2, 3, 4


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past, present = names.cache_names(num_layers)
    return [names.INPUT_IDS, names.ATTENTION_MASK, names.POSITION_IDS, *past], [names.LOGITS, *present]


class FlatCacheLM(torch.nn.Module):
    """Takes and returns the KV cache as flat tensors; a transformers Cache object does not export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        # One full-length layer per decoder layer (a cache built from the config would keep chunked-attention
        # layers to their window, and the graph's cache is the whole past on every layer)
        cache = DynamicCache()
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def build_skeleton(config, family=None):
    """The family's causal LM (LlamaForCausalLM) whose parameters hold uninitialized memory; buffers are computed
    for real."""
    from llama_export.families import family_of

    causal_lm = (family or family_of(config)).causal_lm_class()
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    config.use_cache = True
    with torch.device("meta"):
        model = causal_lm(config)
    model = model.to_empty(device="cpu").eval()
    # to_empty leaves the rotary buffers uninitialized too; rebuild that module so its frequencies are real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def _example_inputs(config):
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    input_ids = torch.zeros((_BATCH, _SEQ), dtype=torch.int64)
    attention_mask = torch.ones((_BATCH, _PAST + _SEQ), dtype=torch.int64)
    position_ids = torch.arange(_PAST, _PAST + _SEQ, dtype=torch.int64).expand(_BATCH, _SEQ)
    past = [torch.zeros((_BATCH, kv_heads, _PAST, head_dim)) for _ in range(2 * config.num_hidden_layers)]
    return input_ids, attention_mask, position_ids, past


def _dynamic_shapes(num_layers: int):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past} for _ in range(2 * num_layers)],
    }


def trace_to_onnx(checkpoint: Checkpoint) -> ir.Model:
    """The model's ONNX graph at opset 23, weights bound lazily to the checkpoint.

    The tracing runs in a child process: torch.export leaves its graphs and caches reachable from module globals,
    and even once freed their memory stays with the process (fragmented among live objects), where it would add
    to verify's peak."""
    causal_lm = checkpoint.family.causal_lm_class()
    with torch.device("meta"):
        parameters = {name: tuple(p.shape) for name, p in
                      causal_lm(checkpoint.config).named_parameters(remove_duplicate=False)}
    checkpoint.check_complete(parameters)
    exported = _trace_in_child(checkpoint.config, set(parameters))
    _bind_weights(exported, checkpoint, set(parameters))
    return exported


def _trace_in_child(config, parameter_names: set[str]) -> ir.Model:
    from llama_export.exporter import trace_cache
    from llama_export.exporter.child_process import call_in_child

    key = trace_cache.trace_key_or_none(config, sorted(parameter_names))
    graph = trace_cache.load(key) if key else None
    if graph is not None:
        model = ir.serde.deserialize_model(onnx.load_model_from_string(graph))
        model.meta[FROM_CACHE] = True
        return model
    from llama_export.families import family_of

    # The family travels with the request: one registered at run time (by a user's script) is unknown to the child.
    graph = call_in_child(__name__, "trace_child", (config, sorted(parameter_names), family_of(config)), "tracing")
    if key:
        trace_cache.store(key, graph)
    return ir.serde.deserialize_model(onnx.load_model_from_string(graph))


def trace_child(config, parameter_names: list[str], family) -> bytes:
    """The child's side: the graph, serialized, its parameters as references to no file (bound by the parent)."""
    parameter_names = set(parameter_names)
    inputs, outputs = io_names(config.num_hidden_layers)
    with family.traced_forms():
        exported = _export(FlatCacheLM(build_skeleton(config, family)).eval(), _example_inputs(config), inputs,
                           outputs, _dynamic_shapes(config.num_hidden_layers))
    # torch's debug records (each node's Python stack trace with this machine's file paths, module scopes; the
    # exported program's signature) have no use in a package and would ship with it
    for node in exported.graph.all_nodes():
        node.metadata_props.clear()
    exported.graph.metadata_props.clear()
    for value in exported.graph.initializers.values():
        if value.name.removeprefix("model.") in parameter_names:
            tensor = value.const_value
            value.const_value = ir.ExternalTensor(UNBOUND, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=value.name)
    return ir.serde.serialize_model(exported).SerializeToString()


def _export(module, args, input_names, output_names, dynamic_shapes) -> ir.Model:
    from llama_export.families import routed_experts

    noisy = ["torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"]
    levels = {name: logging.getLogger(name).level for name in noisy}
    try:
        for name in noisy:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=OPSET,
                optimize=False,  # folding here would read the uninitialized weights
                dynamic_shapes={"input_ids": dynamic_shapes["input_ids"],
                                "attention_mask": dynamic_shapes["attention_mask"],
                                "position_ids": dynamic_shapes["position_ids"],
                                "past": dynamic_shapes["past"]},
                input_names=input_names,
                output_names=output_names,
                verbose=False,
                custom_translation_table=routed_experts.onnx_translations(),
            )
    except Exception as exc:
        raise UserError(f"tracing failed: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return program.model


def _lazy_weight(checkpoint: Checkpoint, name: str, shape) -> ir.LazyTensor:
    info = checkpoint.weight(name)
    if info.load_rows is not None and len(info.shape) == 2:
        return RowStreamedTensor(info.rows, info.shape[0], info.shape[1], name)

    def load() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(info.load(), dtype=np.float32), name=name)

    return ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)


def _bind_weights(model: ir.Model, checkpoint: Checkpoint, parameter_names: set[str]) -> None:
    """Point every parameter initializer at the checkpoint; rename it to the checkpoint's tensor name."""
    prefix = "model."  # FlatCacheLM's attribute
    bound = 0
    for value in list(model.graph.initializers.values()):
        name = value.name.removeprefix(prefix)
        if name in parameter_names:
            value.const_value = _lazy_weight(checkpoint, name, value.shape)
            value.meta[SOURCE_NAMES] = [checkpoint.tensor_name(name)]
            if checkpoint.weight(name).load_rows is not None:
                value.meta[ROW_READER] = checkpoint.weight(name).rows
            bound += 1
        model.graph.initializers.pop(value.name)
        value.name = name
        model.graph.register_initializer(value)
    if bound == 0:
        raise UserError("tracing produced no weight initializers; the exporter's naming may have changed")
    initializers = model.graph.initializers
    if checkpoint.config.tie_word_embeddings and {"lm_head.weight", "model.embed_tokens.weight"} <= set(initializers):
        # The exporter lists a tied parameter under both names; keep one so it is stored once.
        lm_head = initializers.pop("lm_head.weight")
        lm_head.replace_all_uses_with(initializers["model.embed_tokens.weight"])
