"""LLaMA 4 text models (Scout, Maverick): transformers' modeling_llama4.

What differs from LLaMA 1-3: mixture-of-experts feed-forward layers (a router picks one of `num_local_experts`,
the sigmoid of its score scales the token before that expert, a shared dense expert always runs), dense layers of
`intermediate_size_mlp`, chunked local attention on the RoPE layers and global attention without RoPE (NoPE, every
fourth layer, with attention temperature tuning), an L2 norm on queries and keys, RoPE on interleaved pairs.

For tracing, `traced_forms` swaps two of transformers' forms for equivalent ones the ONNX exporter takes: the
complex-number rotary embedding becomes real arithmetic on the same pairs, and the feed-forward's experts (which
transformers runs densely, every token through every expert) become one routed-experts operator that later passes
lower to ONNX Runtime's MoE kernels or to gathers of the chosen expert's weights."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from llama_export.families.base import FamilyConfigError, ModelFamily
from llama_export.families.llama import attention_shapes, attention_weights, model_wide_shapes


@dataclass(frozen=True)
class Llama4Family(ModelFamily):
    experts_module: str = "Llama4TextMoe"

    def check_config(self, config) -> None:
        """What the traced forms assume (every published LLaMA 4 model has it)."""
        if getattr(config, "num_experts_per_tok", 1) != 1:
            raise FamilyConfigError(f"num_experts_per_tok is {config.num_experts_per_tok}; llama-export's LLaMA 4 "
                                    "experts take one expert per token, as every published LLaMA 4 model does")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise FamilyConfigError(f"hidden_act is {config.hidden_act!r}; the experts' kernels compute SiLU (every "
                                    "published LLaMA 4 model uses it)")
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type in ("dynamic", "longrope"):  # their frequencies change with the sequence, the traced form's not
            raise FamilyConfigError(f"rope type {rope_type!r} is not supported for LLaMA 4 (default, linear, llama3 "
                                    "and yarn are)")

    def parameter_shapes(self, config) -> dict[str, tuple[int, ...]]:
        hidden = config.hidden_size
        shapes, attention = model_wide_shapes(config), attention_shapes(config)
        inter, dense, experts = config.intermediate_size, config.intermediate_size_mlp, config.num_local_experts
        moe = {"feed_forward.router.weight": (experts, hidden),
               "feed_forward.experts.gate_up_proj": (experts, hidden, 2 * inter),
               "feed_forward.experts.down_proj": (experts, inter, hidden),
               **_mlp("feed_forward.shared_expert", hidden, inter)}
        mlp = _mlp("feed_forward", hidden, dense)
        for index in range(config.num_hidden_layers):
            layer = {**attention, **(moe if index in config.moe_layers else mlp)}
            shapes.update({f"model.layers.{index}.{name}": shape for name, shape in layer.items()})
        return shapes

    def gguf_config(self, field, prefix: str) -> dict:
        """llama.cpp's reading of a llama4 file (its src/models/llama4.cpp): the expert width under its own key,
        chunked attention with fixed settings unless the sliding window is 0, QK norm unless 128 experts."""
        experts = int(field(prefix + "expert_count", 16))
        fields = {"intermediate_size": int(field(prefix + "expert_feed_forward_length")),
                  "intermediate_size_mlp": int(field(prefix + "feed_forward_length")),
                  "num_local_experts": experts, "num_experts_per_tok": int(field(prefix + "expert_used_count", 1)),
                  "interleave_moe_layer_step": int(field(prefix + "interleave_moe_layer_step", 1)),
                  "use_qk_norm": experts != 128, "attention_chunk_size": 8192, "floor_scale": 8192,
                  "attn_scale": 0.1, "attn_temperature_tuning": True}
        if field(prefix + "attention.sliding_window", None) == 0:  # every layer full attention with RoPE
            layers = int(field(prefix + "block_count"))
            fields.update(attention_chunk_size=None, no_rope_layers=[1] * layers, attn_temperature_tuning=False)
        return fields

    def shape_fields(self, get, size) -> dict:
        layers = size("num_hidden_layers")
        moe_layers = get("moe_layers")
        if not isinstance(moe_layers, list):
            step = size("interleave_moe_layer_step", 1)
            moe_layers = range(step - 1, layers, step)
        return {"experts": size("num_local_experts", 16), "moe_layers": len(moe_layers),
                "intermediate_mlp": size("intermediate_size_mlp", 16384)}

    def layer_weights(self, shape) -> int:
        """Every decoder-layer matrix weight, all experts included (what the package stores)."""
        return shape.moe_layers * _moe_layer(shape, shape.experts) + _dense_layers(shape)

    def active_layer_weights(self, shape) -> int:
        """The decoder-layer weights one token reads: the router, the shared expert and one routed expert."""
        return shape.moe_layers * _moe_layer(shape, 1) + _dense_layers(shape)

    def largest_layer_weights(self, shape) -> int:
        dense = _dense_layer(shape) if shape.moe_layers < shape.layers else 0
        return max(_moe_layer(shape, shape.experts), dense)

    def largest_matrix(self, shape) -> int:
        """The experts' stacked gate/up weight (calibration and verify load a layer's experts whole)."""
        return max(super().largest_matrix(shape), 2 * shape.experts * shape.hidden * shape.intermediate,
                   2 * shape.hidden * shape.intermediate_mlp)

    def layer_mask(self, config, index: int, length: int):
        """The additive mask of layer `index` over one unpadded sequence: chunked on chunked-attention layers."""
        import torch

        if config.layer_types[index] != "chunked_attention":
            return None
        position = torch.arange(length)
        chunk = position // config.attention_chunk_size
        allowed = (position[None, :] <= position[:, None]) & (chunk[:, None] == chunk[None, :])
        return torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    @contextlib.contextmanager
    def traced_forms(self):
        from llama_export.families import llama4_traced

        with llama4_traced.patched(self.module(), self.experts_module):
            yield


def _moe_layer(shape, experts: int) -> int:
    """A MoE layer's matrix weights with `experts` routed experts counted: attention, router, shared expert."""
    return attention_weights(shape) + shape.hidden * (shape.experts + 3 * shape.intermediate * (1 + experts))


def _dense_layer(shape) -> int:
    return attention_weights(shape) + 3 * shape.hidden * shape.intermediate_mlp


def _dense_layers(shape) -> int:
    return (shape.layers - shape.moe_layers) * _dense_layer(shape)


def _mlp(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {f"{prefix}.gate_proj.weight": (inter, hidden), f"{prefix}.up_proj.weight": (inter, hidden),
            f"{prefix}.down_proj.weight": (hidden, inter)}


LLAMA4 = Llama4Family(
    name="llama4",
    model_types=("llama4_text",),
    multimodal_types=("llama4",),  # Llama4ForConditionalGeneration: Meta's Scout and Maverick folders
    genai_type="llama",
    modeling="transformers.models.llama4.modeling_llama4",
    causal_lm="Llama4ForCausalLM",
    config_class="Llama4TextConfig",
    decoder_layer="Llama4TextDecoderLayer",
    norm="Llama4TextRMSNorm",
    rotary="Llama4TextRotaryEmbedding",
    gguf_architecture="llama4",
    gguf_names={"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"},
    gguf_layer_names={
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "ffn_gate_inp": "feed_forward.router", "ffn_gate_shexp": "feed_forward.shared_expert.gate_proj",
        "ffn_up_shexp": "feed_forward.shared_expert.up_proj", "ffn_down_shexp": "feed_forward.shared_expert.down_proj",
        "ffn_gate": "feed_forward.gate_proj", "ffn_up": "feed_forward.up_proj", "ffn_down": "feed_forward.down_proj",
    },
    # llama.cpp's converter splits gate_up_proj and stores each expert's matrices as [out, in]; its Q/K rows are
    # not permuted for llama4 (no gguf_permuted_rows)
    gguf_expert_stacks={"feed_forward.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
                        "feed_forward.experts.down_proj": ("ffn_down_exps",)},
)
