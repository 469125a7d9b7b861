"""LLaMA 1, 2 and 3 (and models of the same architecture, such as SmolLM2): transformers' modeling_llama."""

from __future__ import annotations

from dataclasses import dataclass

from llama_export.families.base import ModelFamily


def model_wide_shapes(config) -> dict[str, tuple[int, ...]]:
    """The embedding, the final norm and an untied lm_head."""
    hidden, vocab = config.hidden_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def attention_shapes(config) -> dict[str, tuple[int, ...]]:
    """One decoder layer's two norms and attention projections (with their biases where the config has them)."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q)}
    if getattr(config, "attention_bias", False):
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                      "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (hidden,)})
    return layer


def attention_weights(shape) -> int:
    """One decoder layer's attention projection weights (targets.plan.ModelShape's sizes)."""
    return shape.hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)


@dataclass(frozen=True)
class LlamaFamily(ModelFamily):
    def parameter_shapes(self, config) -> dict[str, tuple[int, ...]]:
        hidden, inter = config.hidden_size, config.intermediate_size
        shapes = model_wide_shapes(config)
        layer = {**attention_shapes(config), "mlp.gate_proj.weight": (inter, hidden),
                 "mlp.up_proj.weight": (inter, hidden), "mlp.down_proj.weight": (hidden, inter)}
        if getattr(config, "mlp_bias", False):
            layer.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,),
                          "mlp.down_proj.bias": (hidden,)})
        for index in range(config.num_hidden_layers):
            shapes.update({f"model.layers.{index}.{name}": shape for name, shape in layer.items()})
        return shapes

    def layer_weights(self, shape) -> int:
        return shape.layers * (attention_weights(shape) + 3 * shape.hidden * shape.intermediate)


LLAMA = LlamaFamily(
    name="llama",
    model_types=("llama",),
    genai_type="llama",
    modeling="transformers.models.llama.modeling_llama",
    causal_lm="LlamaForCausalLM",
    config_class="LlamaConfig",
    decoder_layer="LlamaDecoderLayer",
    norm="LlamaRMSNorm",
    rotary="LlamaRotaryEmbedding",
    gguf_architecture="llama",
    gguf_names={
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
    gguf_layer_names={
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    gguf_permuted_rows={"q_proj.weight": "num_attention_heads", "k_proj.weight": "num_key_value_heads"},
)
