"""What a model family declares (see families/llama.py for LLaMA's)."""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class UnsupportedFamily(ValueError):
    """A config or GGUF architecture no registered family handles."""

    def __init__(self, name, known: list[str]):
        super().__init__(f"unsupported architecture '{name}'; llama-export handles LLaMA-family models "
                         f"(model_type {', '.join(known)})")


class FamilyConfigError(ValueError):
    """A config of a known family with a setting the family's traced form does not handle."""


@dataclass(frozen=True)
class ModelFamily:
    name: str  # the manifest's "architecture"
    model_types: tuple[str, ...]  # config.json model_type values
    genai_type: str  # onnxruntime-genai's genai_config.json model.type
    modeling: str  # the transformers module holding the classes below
    causal_lm: str  # the *ForCausalLM class, traced and used as verify's reference
    config_class: str  # the config class a GGUF's metadata becomes (imported from transformers)
    decoder_layer: str  # one decoder layer: calibration and verify run the model layer by layer
    norm: str  # the final norm's class
    rotary: str  # the rotary embedding module (position embeddings handed to each layer)
    gguf_architecture: str | None = None  # GGUF general.architecture (None: GGUF files are not read)
    # GGUF tensor name -> Hugging Face parameter name: model-wide tensors, and per layer (blk.N.NAME.weight)
    gguf_names: dict[str, str] = field(default_factory=dict)
    gguf_layer_names: dict[str, str] = field(default_factory=dict)
    # Per-layer parameters whose rows llama.cpp's converter interleaved for its rotary form, and the config field
    # giving their head count (the GGUF reader undoes the interleaving)
    gguf_permuted_rows: dict[str, str] = field(default_factory=dict)
    # Per-layer 3-D expert parameters (transformers' [experts, in, out]) -> the GGUF tensors (blk.N.NAME.weight,
    # each [experts, out_i, in]) joined along their outputs to make it
    gguf_expert_stacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # config.json model_type values of multimodal checkpoints holding this family's text model (its config as
    # the text config, its weights under language_model.): the text model alone is exported
    multimodal_types: tuple[str, ...] = ()

    def module(self):
        return importlib.import_module(self.modeling)

    def causal_lm_class(self):
        return getattr(self.module(), self.causal_lm)

    def config_type(self):
        import transformers

        return getattr(transformers, self.config_class)

    def decoder_layer_class(self):
        return getattr(self.module(), self.decoder_layer)

    def norm_class(self):
        return getattr(self.module(), self.norm)

    def rotary_class(self):
        return getattr(self.module(), self.rotary)

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face parameter a GGUF tensor holds (None: a tensor the family does not use)."""
        if gguf_name in self.gguf_names:
            return self.gguf_names[gguf_name]
        match = _GGUF_LAYER.fullmatch(gguf_name)
        if match and match.group(2) in self.gguf_layer_names:
            return f"model.layers.{match.group(1)}.{self.gguf_layer_names[match.group(2)]}.weight"
        return None

    def permuted_heads(self, hf_name: str, config) -> int | None:
        """The head count to undo llama.cpp's row interleaving with, for a parameter that has it."""
        for suffix, heads in self.gguf_permuted_rows.items():
            if hf_name.endswith(suffix):
                return getattr(config, heads)
        return None

    @staticmethod
    def text_weight_name(name: str) -> str | None:
        """A multimodal checkpoint's tensor name as the text model's parameter (None: not the text model's).
        Meta's folders prefix the text model with `language_model.`; transformers 5 saves it as
        `model.language_model.` with the lm_head at the top."""
        if name.startswith("language_model."):
            return name.removeprefix("language_model.")
        if name.startswith("model.language_model."):
            return "model." + name.removeprefix("model.language_model.")
        return name if name == "lm_head.weight" else None

    def gguf_config(self, field, prefix: str) -> dict:
        """Config fields beyond LLaMA's from a GGUF's metadata: `field(key, default)` reads one, `prefix` is the
        architecture's key prefix ("llama4.")."""
        return {}

    def check_config(self, config) -> None:
        """Refuse (FamilyConfigError) a config the family's traced form does not handle."""

    def layer_mask(self, config, index: int, length: int):
        """The additive attention mask [1, 1, length, length] decoder layer `index` takes over unpadded sequences
        (calibration, the 8-bit choice and verify run transformers' layers one at a time), or None where it is
        the plain causal mask."""
        return None

    def traced_forms(self):
        """A context manager under which transformers' model traces into ONNX (a family whose modeling code uses
        forms the exporter does not take swaps them for equivalent ones here)."""
        import contextlib

        return contextlib.nullcontext()

    def shape_fields(self, get, size) -> dict:
        """Sizes beyond LLaMA's that the family's weight formulas need (targets.plan.ModelShape's optional fields),
        from a config: `get(key, default)` reads it, `size(key, default)` reads a checked whole number."""
        return {}

    def largest_layer_weights(self, shape) -> int:
        """Weights of the largest decoder layer (calibration and verify hold one layer at a time)."""
        return self.layer_weights(shape) // shape.layers

    def largest_matrix(self, shape) -> int:
        """Elements of the largest weight a pass or the quantizer reads whole (a packed projection)."""
        return max(2 * shape.hidden * shape.intermediate, shape.hidden * shape.head_dim * (shape.heads
                                                                                        + 2 * shape.kv_heads))

    def active_layer_weights(self, shape) -> int:
        """Decoder-layer weights one token reads (a mixture of experts reads fewer than it stores)."""
        return self.layer_weights(shape)

    def parameter_shapes(self, config) -> dict[str, tuple[int, ...]]:
        """Every parameter the family's model of this config holds, with its shape, from the config alone."""
        raise NotImplementedError

    def layer_weights(self, shape) -> int:
        """Weights in the decoder layers' matrices (targets.plan.ModelShape's sizes): what INT4 quantizes."""
        raise NotImplementedError
