"""Names every room shares (a leaf module: it imports nothing of the project, and any room may import it): the
operator domain of ONNX Runtime's contrib ops, the package graph's inputs and outputs (what onnxruntime-genai's
genai_config.json names), and the metadata keys passes and the exporter leave on values and models."""

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators

# The graph's inputs and outputs; KV-cache names take the layer index
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The past and present KV-cache names, key then value for each layer."""
    past = [name % i for i in range(num_layers) for name in (PAST_KEY, PAST_VALUE)]
    present = [name % i for i in range(num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    return past, present


# Value.meta key: f(start, stop) -> rows [start, stop) of the weight in its [out, in] layout, read alone (a source
# tensor that can be sliced); the quantizer then reads weights in row chunks instead of whole. A pass that changes
# a weight's values must wrap it too (passes/scaling.py does).
ROW_READER = "row_reader"
# Value.meta key: the per-column scale input scaling divided a norm's weight by (passes/scaling.py)
INPUT_SCALE = "input_scale"
# Model.meta key: the graph came from the trace cache (exporter/trace_cache.py)
FROM_CACHE = "traced-earlier"
# Value.meta key: the checkpoint tensors a weight holds, stacked along N (set when the graph's weights are bound)
SOURCE_NAMES = "checkpoint_names"

# llama-export's own operator domain: operators the trace emits for a pass to lower per target (never in a package)
EXPORT_DOMAIN = "llama_export"
# RoutedExperts(x [tokens, hidden], router_logits [tokens, experts], gate_up [experts, hidden, 2*inter],
# down [experts, inter, hidden]) -> [tokens, hidden]: each token through the expert of its largest router logit
# (top-1), SiLU(gate) * up with gate the first half of gate_up's output; the token arrives already scaled.
ROUTED_EXPERTS = "RoutedExperts"
