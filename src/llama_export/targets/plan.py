"""Memory planning: will a model, at a precision and context, fit the target device? Needs only the config.

The budget follows what the package holds and what TensorRT allocates at run time:
- weights: the decoder layers' projections (INT4 as the target's preset lays it out: TensorRT's, half a byte per
  weight plus an fp16 scale per block), norms;
- embeddings: the lookup table and the lm_head stay fp16 on TensorRT targets (INT4 weights or not);
- KV cache: fp16, 2 * layers * kv_heads * head_dim * 2 bytes per token, twice over because the graph's cache
  Concat reads the past buffer and writes the present one;
- activations at the largest prefill chunk: hidden states, MLP intermediates, attention scores (fp32 softmax
  plus fp16 copy) and logits, plus the TensorRT workspace the build scripts cap;
- what the device keeps for itself (target.reserved_gb: on Jetson the OS shares the memory)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from llama_export.targets.base import Target, TargetError

GIB = 1 << 30
WORKSPACE_BYTES = 1 << 30  # the builder's workspace cap (build_engine.py / build_engine.sh)
DEFAULT_PREFILL = 512  # largest prompt chunk a step takes; longer prompts are fed in chunks
CONTEXT_STEPS = (131072, 65536, 32768, 16384, 8192, 4096, 2048, 1024, 512)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_context: int
    family: str = "llama"  # llama_export.families: the weight formulas
    # a mixture of experts (0: none): experts per MoE layer, MoE layers, the dense layers' MLP width
    experts: int = 0
    moe_layers: int = 0
    intermediate_mlp: int = 0

    @classmethod
    def from_config(cls, config, name: str = "model") -> ModelShape:
        """The sizes a plan needs, each checked: a zero, negative or fractional size names itself."""
        if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
            config = config["text_config"]  # a multimodal checkpoint's config (LLaMA 4): its text model
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)

        def size(key: str, default=None) -> int:
            value = get(key)
            if value is None:
                value = default
            if value is None:
                raise TargetError(f"{name}: the config lacks {key} (a LLaMA plan needs hidden_size, "
                                  "num_attention_heads, num_hidden_layers, intermediate_size, vocab_size)")
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value != int(value) or value < 1):
                raise TargetError(f"{name}: {key} is {value!r}; it must be a whole number of at least 1")
            return int(value)

        from llama_export.families import UnsupportedFamily, family_of

        try:
            family = family_of(config)
        except UnsupportedFamily as exc:
            raise TargetError(f"{name}: {exc}") from None
        hidden, heads = size("hidden_size"), size("num_attention_heads")
        kv_heads = size("num_key_value_heads", heads)
        if heads % kv_heads:
            raise TargetError(f"{name}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads}")
        return cls(name=name, layers=size("num_hidden_layers"), hidden=hidden,
                   intermediate=size("intermediate_size"), heads=heads, kv_heads=kv_heads,
                   head_dim=size("head_dim", hidden // heads or None), vocab=size("vocab_size"),
                   tied=bool(get("tie_word_embeddings", False)),
                   max_context=size("max_position_embeddings", 4096), family=family.name,
                   **family.shape_fields(get, size))

    @classmethod
    def from_json(cls, path: Path) -> ModelShape:
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise TargetError(f"{path}: not a readable config.json ({exc})") from None
        if not isinstance(config, dict):
            raise TargetError(f"{path}: not a config.json object")
        return cls.from_config(config, name=Path(path).parent.name or Path(path).name)

    @property
    def layer_weights(self) -> int:
        from llama_export.families import FAMILIES

        return FAMILIES[self.family].layer_weights(self)

    @property
    def parameters(self) -> int:
        """Every weight: the layers', the embedding table, the lm_head unless tied (norms aside)."""
        return self.layer_weights + self.table_weights

    @property
    def active_parameters(self) -> int:
        return self.active_layer_weights + self.table_weights

    @property
    def table_weights(self) -> int:
        """The embedding table and the lm_head unless tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def active_layer_weights(self) -> int:
        """Of layer_weights, those one token reads (fewer for a mixture of experts)."""
        from llama_export.families import FAMILIES

        return FAMILIES[self.family].active_layer_weights(self)


def _layer_weight_bytes(target: Target, model: ModelShape, precision: str, block: int) -> float:
    if precision == "int4":
        return target.int4_preset(block).layer_bytes(model.layer_weights, model.layers, block)
    return model.layer_weights * (4 if precision == "fp32" else 2)


@dataclass
class MemoryPlan:
    target: Target
    model: ModelShape
    precision: str
    context: int
    batch: int
    prefill: int
    lines: list[tuple[str, float]]  # (what, bytes)

    @property
    def total(self) -> float:
        return sum(size for _, size in self.lines)

    @property
    def capacity(self) -> float:
        return self.target.memory_gb * GIB

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def table(self) -> str:
        m = self.model
        rows = [f"Memory plan: {m.name} ({m.layers} layers, hidden {m.hidden}, {m.heads}/{m.kv_heads} q/kv heads, "
                f"vocab {m.vocab}) on {self.target.name} ({self.target.device}, {self.target.memory_gb:g} GiB)",
                f"  {self.precision}, context {self.context}, batch {self.batch}, prefill chunk {self.prefill}"]
        if m.experts:
            rows.append(f"  parameters: {m.parameters / 1e9:.1f}B in total, {m.active_parameters / 1e9:.1f}B active "
                        f"per token ({m.experts} experts in {m.moe_layers} of {m.layers} layers, one routed expert "
                        "per token); every expert is held in memory")
        rows += [f"  {label:<44} {size / GIB:>8.2f} GiB" for label, size in self.lines]
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"  {'total':<44} {self.total / GIB:>8.2f} GiB of {self.target.memory_gb:g} GiB: {verdict} "
                    f"({(self.capacity - self.total) / GIB:+.2f} GiB)")
        return "\n".join(rows)


def plan_memory(target: Target, model: ModelShape, precision: str, context: int, batch: int = 1,
                block_size: int | None = None, prefill: int | None = None) -> MemoryPlan:
    if target.memory_gb is None:
        raise TargetError(f"target '{target.name}' has no device memory to plan against")
    block = block_size or target.default_block_size
    prefill = min(prefill or DEFAULT_PREFILL, context)
    half = 2
    layer_bytes = _layer_weight_bytes(target, model, precision, block) + (2 * model.layers + 1) * model.hidden * half
    # The lookup table and the lm_head stay fp16 unless the target's INT4 preset quantizes them (TensorRT's does not)
    embeddings = model.vocab * model.hidden * half * (1 if model.tied else 2)
    embedding_label = f"embeddings + lm_head (fp16{', tied' if model.tied else ''})"
    preset = target.int4_preset(block)
    if precision == "int4" and preset.lm_head_bits is not None:
        embeddings = preset.table_bytes(model.vocab, model.hidden, model.tied, block, float_embedding=False)
        embedding_label = f"embeddings + lm_head ({preset.lm_head_bits}-bit{', tied' if model.tied else ''})"
    kv = 2 * model.layers * model.kv_heads * model.head_dim * half * context * batch * 2
    tokens = batch * prefill
    activations = (tokens * (4 * model.hidden + 3 * model.intermediate + model.head_dim * (model.heads + 2 *
                                                                                            model.kv_heads)) * half
                   + batch * model.heads * prefill * context * (4 + half)
                   + tokens * model.vocab * (half + 4))
    lines = [
        (f"weights, {model.layers} decoder layers ({precision}"
         f"{f', block {block}' if precision == 'int4' else ''})", layer_bytes),
        (embedding_label, embeddings),
        (f"KV cache (fp16, {context} tokens, past + present)", kv),
        (f"activations (prefill {prefill} tokens)", activations),
        ("TensorRT workspace", WORKSPACE_BYTES),
        ("OS, CUDA and TensorRT runtime" if target.platform and "JetPack" in target.platform
         else "CUDA and TensorRT runtime", target.reserved_gb * GIB),
    ]
    return MemoryPlan(target, model, precision, context, batch, prefill, lines)


def alternatives(plan: MemoryPlan) -> list[MemoryPlan]:
    """Plans that fit, nearest first: the same precision at shorter contexts, then INT4 at the requested
    context and shorter ones."""
    found = []
    precisions = [plan.precision] + (["int4"] if plan.precision != "int4" and "int4" in plan.target.precisions
                                     else [])
    for precision in precisions:
        for context in [plan.context] + [c for c in CONTEXT_STEPS if c < plan.context]:
            if precision == plan.precision and context == plan.context:
                continue
            if found and context <= found[-1].context:
                break  # no longer than what a cheaper change already allows
            candidate = plan_memory(plan.target, plan.model, precision, context, plan.batch, prefill=plan.prefill)
            if candidate.fits:
                found.append(candidate)
                break
    return found


def refusal(plan: MemoryPlan) -> str:
    """One line: what does not fit, by how much, and what would."""
    m = plan.model
    text = (f"{m.name} in {plan.precision} at context {plan.context} needs {plan.total / GIB:.1f} GiB on "
            f"{plan.target.name} ({plan.target.memory_gb:g} GiB)")
    options = alternatives(plan)
    if options:
        fits = "; or ".join(f"--precision {p.precision} --context {p.context} ({p.total / GIB:.1f} GiB)"
                            for p in options)
        return f"{text}; it would fit with {fits}"
    smallest = plan_memory(plan.target, plan.model, "int4" if "int4" in plan.target.precisions else plan.precision,
                           CONTEXT_STEPS[-1], 1, prefill=plan.prefill)
    text += f"; nothing fits this device (INT4 at context {smallest.context} needs {smallest.total / GIB:.1f} GiB)"
    from llama_export.targets import TARGETS

    bigger = [t.name for t in TARGETS.values() if t.memory_gb and t.memory_gb > plan.target.memory_gb
              and plan.precision in t.precisions
              and plan_memory(t, plan.model, plan.precision, plan.context, plan.batch, prefill=plan.prefill).fits]
    return text + (f"; as asked it fits {', '.join(bigger)}" if bigger else "")
