"""Parity of a package with the PyTorch reference (transformers' implementation of the source model), in two parts.

Exactness proves the compiler right: the package must compute what transformers computes with the very weights the
package holds. For a quantized package those are read back from its own bytes (exporter/package_weights.py) and
each must be a quantization of the source's (no row further from the source's than WEIGHT_ROW_BOUND); the graph
then runs with float32 activations (MatMulNBits' int8 activations are ONNX Runtime's arithmetic, not the
compiler's, and are reported apart) and must agree within fp32's tolerance. Quality measures what quantization
costs against the fp32 source: top-1 agreement, KL divergence per position (as llama.cpp's --kl-divergence) and
perplexity on the built-in held-out text; it gates only when asked (--min-top1, --max-kl).

For each built-in prompt the package prefills, then decodes greedily on its own, keeping its logits; a few windows
of the held-out text are prefilled too. The reference runs once over each sequence. Every position's logits are
compared; the package's greedy tokens match the reference's exactly when each of its choices is the reference's
argmax at that position."""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from llama_export.exporter.sources import Checkpoint

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village at the edge of a great forest, there lived",
)
# Used when a package has no tokenizer (token ids chosen to be valid for any vocabulary of 32+).
FALLBACK_PROMPTS = ((1, 7, 3, 12, 5), (2, 9, 30, 4, 4, 17, 8), (11, 6, 21))


@dataclass(frozen=True)
class Tolerance:
    max_abs_logit_diff: float | None  # None: not checked for this precision
    min_top1_agreement: float
    all_greedy_tokens: bool
    # Or this fraction of the largest |logit| where that is more: float32 rounding grows with the values summed
    # (2e-6 is about 16 units in the last place; a 1B-shaped model with logits in the thousands differs from
    # PyTorch by 1.5 units, 1.46e-3).
    relative_logit_diff: float = 0.0


# A quantized row further than this from the source's row (relative to the row's size) is no quantization of it
# (zeroed: 1.0, negated: 2.0, another row: about 1.4). 4-bit GPTQ with input scaling at block 128 measures at
# most 0.42 on the default model, plain rounding about 0.1 per row. Rows are compared as each matrix meets its
# norm (input scaling moves a scale between the two).
WEIGHT_ROW_BOUND = 0.75
TEXT_WINDOWS, TEXT_WINDOW = 4, 128  # the held-out text the quality part scores
EXACT = Tolerance(max_abs_logit_diff=1e-3, min_top1_agreement=1.0, all_greedy_tokens=True, relative_logit_diff=2e-6)


@dataclass(frozen=True)
class Gates:
    """Opt-in quality gates: verify fails when top-1 agreement with the fp32 source is below `min_top1` or the mean
    KL divergence per position above `max_kl`."""
    min_top1: float | None = None
    max_kl: float | None = None


TOLERANCES = {
    "fp32": EXACT,
    # fp16 weights and activations: near-ties may flip, and once a greedy token differs the texts part ways, so
    # agreement per position is what is held (this project's issues: 0.98).
    "fp16": Tolerance(max_abs_logit_diff=None, min_top1_agreement=0.98, all_greedy_tokens=False),
    # INT4 changes the weights on purpose. Where exactness cannot be checked (an ORT-format package, whose weights
    # cannot be read back) the next-token choice must still agree with fp32 almost everywhere.
    "int4": Tolerance(max_abs_logit_diff=None, min_top1_agreement=0.85, all_greedy_tokens=False),
}


class StreamedReference:
    """transformers' causal LM of the checkpoint's family (fp32, eager attention) over whole token sequences,
    computed one decoder layer at a time with transformers' own layer classes: only that layer's weights are
    loaded, the embedding and lm_head are read in row chunks, so a model of any size needs one layer's memory."""

    def __init__(self, checkpoint: Checkpoint):
        import copy

        self.checkpoint = checkpoint
        self.config = copy.deepcopy(checkpoint.config)
        self.config._attn_implementation = "eager"

    def __call__(self, sequences: list[list[int]], log=None) -> list[np.ndarray]:
        """Logits [tokens, vocab] of each sequence, every position."""
        import torch

        from llama_export.exporter.calibrate import embed, final_norm, float_tensor, layer_output, load_layer
        from llama_export.exporter.progress import counter_for

        config, checkpoint = self.config, self.checkpoint
        family = checkpoint.family
        rotary = family.rotary_class()(config)
        hidden = [embed(checkpoint, np.array([ids])) for ids in sequences]
        positions = [torch.arange(len(ids)).unsqueeze(0) for ids in sequences]
        position_embeddings = [rotary(h, p) for h, p in zip(hidden, positions)]
        # eager attention takes the causal mask explicitly (where the family's layer_mask is None)
        causal = [torch.full((len(ids), len(ids)), torch.finfo(torch.float32).min).triu(1)[None, None]
                  for ids in sequences]
        count = counter_for(log, "reference layer", "layer")
        with torch.no_grad():
            for index in range(config.num_hidden_layers):
                layer = load_layer(checkpoint, index, config)
                for j in range(len(hidden)):
                    mask = family.layer_mask(config, index, len(sequences[j]))
                    out = layer(hidden[j], attention_mask=causal[j] if mask is None else mask,
                                position_ids=positions[j], position_embeddings=position_embeddings[j])
                    hidden[j] = layer_output(out)
                del layer
                count(index + 1, config.num_hidden_layers)
            norm = final_norm(checkpoint, config)
            normed = [norm(h)[0] for h in hidden]
        head = checkpoint.weight("lm_head.weight")
        logits = [np.empty((len(ids), head.shape[0]), np.float32) for ids in sequences]
        for start, rows in head.row_chunks():
            table = float_tensor(rows)  # copied where the source hands out a read-only view
            for out, h in zip(logits, normed):
                out[:, start:start + len(rows)] = torch.nn.functional.linear(h, table).numpy()
        return logits


def reference_model(checkpoint: Checkpoint):
    """transformers' causal LM of the checkpoint's family (LlamaForCausalLM) with its weights, fp32, eager
    attention."""
    import copy

    import torch

    config = copy.deepcopy(checkpoint.config)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = checkpoint.family.causal_lm_class()(config)
    state = {name: torch.from_numpy(np.array(checkpoint.weight(name).load())) for name, _ in model.named_parameters()}
    model.load_state_dict(state, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.tie_weights()
    return model.eval()


def _sequences(folder) -> tuple[list[list[int]], list[list[int]]]:
    """The built-in prompts and windows of the held-out text, tokenized by the package; without a tokenizer the
    fallback ids and no text."""
    from llama_export.runtimes.onnx_package import PackageError, PackageLayout
    from llama_export.runtimes.tokenizer import PackageTokenizer

    try:
        tokenizer = PackageTokenizer(folder)
    except PackageError:
        return [list(p) for p in FALLBACK_PROMPTS], []
    window = min(TEXT_WINDOW, PackageLayout(folder).context_length or TEXT_WINDOW)
    text = resources.files("llama_export.exporter").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    windows = [ids[i:i + window] for i in range(0, window * TEXT_WINDOWS, window) if i + window <= len(ids)]
    return [tokenizer.encode(p) for p in PROMPTS], windows


def verify_package(folder, checkpoint: Checkpoint, precision: str, new_tokens: int = 32, log=None,
                   reference=None, gates: Gates = Gates()) -> dict:
    """The package runs every sequence first and is closed (twice for a graph with int8 activations: as shipped,
    then with float32 activations for exactness); then the references (by default StreamedReference; `reference`,
    any callable from token sequences to their logits, replaces the source's) run over the same tokens, so the
    package and PyTorch never share memory."""
    from llama_export.runtimes.onnx_package import PackageLayout

    check_same_shape(PackageLayout(folder), checkpoint)
    runs, exact_runs = runs_for_verify(folder, precision, new_tokens)
    return compare_with_reference(runs, checkpoint, precision, log=log, reference=reference, folder=folder,
                                  exact_runs=exact_runs, gates=gates)


def runs_for_verify(folder, precision: str, new_tokens: int = 32, graph=None):
    """(the package's runs as shipped, its float32-activation runs or None): what compare_with_reference takes.
    `graph`: a folder holding the package's model.onnx where the package ships another format. Nothing of
    PyTorch is loaded; the sessions' memory is handed back."""
    from llama_export.exporter.export_memory import hand_back_freed_memory

    graph = Path(graph or folder)
    runs = package_runs(folder, new_tokens)
    model_file = None if graph == Path(folder) else str((graph / "model.onnx").relative_to(folder))
    exact_runs = package_runs(folder, new_tokens, fp32_activations=True, model_file=model_file, text=False) if (
        precision == "int4" and int8_activations(graph)) else None
    hand_back_freed_memory()
    return runs, exact_runs


def int8_activations(folder) -> bool:
    """Whether the package's graph (model.onnx) has a MatMulNBits with int8 activations (accuracy_level 4)."""
    import onnx

    path = Path(folder) / "model.onnx"
    if not path.is_file():
        return False
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type == "MatMulNBits" and any(a.name == "accuracy_level" and a.i != 0 for a in node.attribute)
               for node in graph.node)


# Held-out windows are prefilled this many tokens at a time (the same logits as at once): a whole window's logits
# over a 128k vocabulary would sit in ONNX Runtime's arena beside an 8B session.
WINDOW_CHUNK = 32


def package_runs(folder, new_tokens: int = 32, fp32_activations: bool = False, model_file: str | None = None,
                 text: bool = True) -> list[tuple[list[int], list[int], np.ndarray]]:
    """(prompt, greedy tokens, logits of every position) of each built-in prompt, then (window, [], logits) of
    each held-out text window, run by the package: ONNX Runtime only, nothing of PyTorch. The session is closed and
    its memory handed back on return."""
    from llama_export.exporter.export_memory import hand_back_freed_memory
    from llama_export.runtimes import Decoder, OnnxPackage

    package = OnnxPackage(folder, model_file=model_file, fp32_activations=fp32_activations)
    prompts, windows = _sequences(folder)
    runs = []
    for prompt in prompts:
        decoder = Decoder(package)
        step_logits = [decoder.prefill(prompt)]
        tokens = []
        for i in range(new_tokens):
            tokens.append(int(np.argmax(step_logits[-1][-1])))
            if i < new_tokens - 1:
                step_logits.append(decoder.decode(tokens[-1])[None, :])
        runs.append((prompt, tokens, SpilledLogits(np.concatenate(step_logits))))
        del decoder
    for window in windows if text else []:
        decoder = Decoder(package)
        chunks = [decoder.prefill(window[start:start + WINDOW_CHUNK]) for start in range(0, len(window), WINDOW_CHUNK)]
        runs.append((window, [], SpilledLogits(np.concatenate(chunks))))
    del package
    hand_back_freed_memory()
    return runs


class SpilledLogits:
    """Logits kept in a temporary file until they are compared (a held-out window's are vocabulary x tokens, 65 MB
    at a 128k vocabulary): the runs of one session take no memory beside the next session or the reference.
    np.asarray() reads them back."""

    def __init__(self, logits: np.ndarray):
        self._file = tempfile.TemporaryFile()
        np.save(self._file, np.asarray(logits, np.float32))
        self.shape = logits.shape

    def __array__(self, dtype=None, copy=None):
        self._file.seek(0)
        values = np.load(self._file)
        return values if dtype is None else values.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


def _reference_ids(run) -> list[int]:
    prompt, tokens, _ = run
    return prompt + tokens[:-1]


def compare_with_reference(runs, checkpoint: Checkpoint, precision: str, log=None, reference=None, folder=None,
                           exact_runs=None, gates: Gates = Gates()) -> dict:
    """Exactness and quality of the package's runs (see the module's docstring). Exactness is held on the prompts
    and their greedy continuations, the positions the precisions' tolerances were set on; quality covers the
    held-out windows too. For a quantized package whose graph can be read (`folder` holding model.onnx),
    exactness compares `exact_runs` (the float32-activation runs; `runs` where there are none) with transformers
    running the package's weights; otherwise the comparison with the source under the precision's tolerance is
    the exactness check. The top-level figures are the prompts' comparison with the source."""
    source_reference = reference if reference is not None else StreamedReference(checkpoint)
    if log:
        log("  the fp32 source:")
    references = source_reference([_reference_ids(r) for r in runs], log=log)
    prompts = [r for r in runs if r[1]]
    with_source = _compare(prompts, references[:len(prompts)], TOLERANCES[precision], log)
    quality = _compare(runs, references, None, None)
    result = {**{k: v for k, v in with_source.items() if k not in ("passed", "tolerance")}, "precision": precision,
              "reference": f"transformers {_transformers_version()} {checkpoint.family.causal_lm} (fp32, eager, one "
                           "layer at a time)"}
    readable = folder is not None and (Path(folder) / "model.onnx").is_file()
    if precision == "int4" and readable:
        exactness, arithmetic = _exactness(runs, exact_runs, folder, checkpoint, log)
    elif precision == "int4":
        exactness, arithmetic = {"checked": False, "passed": with_source["passed"], "reason": (
            "the package's weights cannot be read back from an ORT-format file; the top-1 agreement with the fp32 "
            f"source (at least {TOLERANCES['int4'].min_top1_agreement}) is held instead")}, None
    else:
        exactness, arithmetic = {"checked": True, "passed": with_source["passed"], "reference": "the source's weights",
                                 **_figures(with_source), "tolerance": with_source["tolerance"]}, None
    gated = _gates(quality, gates)
    result.update(passed=bool(exactness["passed"] and gated["passed"] and not with_source["non_finite"]),
                  exactness=exactness, quality={**_figures(quality), "mean_kl": quality["mean_kl"],
                                                "max_kl": quality["max_kl"],
                                                "perplexity": _perplexities(runs, references), "gates": gated})
    if arithmetic is not None:
        result["arithmetic"] = arithmetic
    return result


def _exactness(runs, exact_runs, folder, checkpoint: Checkpoint, log) -> tuple[dict, dict | None]:
    """transformers with the package's own weights against the package: with float32 activations where the
    package has int8 ones (those runs held to fp32's tolerance, the shipped ones reported as the kernels'
    arithmetic), else the package as it is (fp16 activations: fp16's tolerance)."""
    from llama_export.exporter.package_weights import package_checkpoint

    package = package_checkpoint(Path(folder), checkpoint, check=True)
    checked = [r for r in (exact_runs if exact_runs is not None else runs) if r[1]]
    shipped = runs if exact_runs is not None else []
    if log:
        log("  the package's own weights:")
    logits = StreamedReference(package)([_reference_ids(r) for r in checked + shipped], log=log)
    fp16 = _float16_activations(folder)
    tolerance = TOLERANCES["fp16"] if fp16 and exact_runs is None else EXACT
    exact = _compare(checked, logits[:len(checked)], tolerance, log)
    worst = package.row_check.largest()
    weights = {"matrices_compared": len(package.row_check.worst), "row_bound": WEIGHT_ROW_BOUND,
               "largest_row_distance": None if worst is None else worst[1],
               "furthest_row": None if worst is None else {"tensor": worst[0], "row": worst[2]}}
    weights["passed"] = worst is not None and worst[1] <= WEIGHT_ROW_BOUND
    exactness = {"checked": True, "passed": bool(exact["passed"] and weights["passed"]),
                 "reference": "the package's own weights",
                 "activations": "float32 (MatMulNBits at accuracy_level 0)" if exact_runs is not None else (
                     "float16" if fp16 else "float32"), **_figures(exact), "tolerance": exact["tolerance"],
                 "weights": weights}
    if exact_runs is None:
        return exactness, None
    as_shipped = _compare(shipped, logits[len(checked):], None, None)
    return exactness, {"activations": "int8 (MatMulNBits at accuracy_level 4)", **_figures(as_shipped),
                       "mean_kl": as_shipped["mean_kl"], "max_kl": as_shipped["max_kl"]}


def _float16_activations(folder) -> bool:
    """Whether the package's graph computes in float16 (its KV cache is float16: the TensorRT targets)."""
    import onnx

    graph = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False).graph
    return any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in [*graph.input, *graph.output])


def _figures(compared: dict) -> dict:
    keys = ("max_abs_logit_diff", "greedy_tokens_compared", "greedy_tokens_matched", "top1_agreement",
            "positions_compared")
    return {key: compared[key] for key in keys}


def _compare(runs, references, tolerance: Tolerance | None, log) -> dict:
    """Every position of each run against the reference's logits: largest difference, greedy tokens matched,
    top-1 agreement, KL divergence of the package's distribution from the reference's; passed under `tolerance`
    (None: figures only)."""
    max_diff, compared, matched, agree, positions = 0.0, 0, 0, 0, 0
    kl_sum, kl_max, largest_logit = 0.0, 0.0, 0.0
    per_prompt, non_finite = [], None
    for number, ((prompt, tokens, ours), theirs) in enumerate(zip(runs, references), 1):
        ours = np.asarray(ours)
        non_finite = non_finite or _first_non_finite(ours, "the package's", number) or _first_non_finite(
            theirs, "the PyTorch reference's (the source weights hold NaN or Inf)", number)
        position_diff = np.abs(ours - theirs).max(-1)
        diff = float(np.max(position_diff))
        largest_logit = max(largest_logit, float(np.max(np.abs(theirs))))
        top1 = ours.argmax(-1) == theirs.argmax(-1)
        kl = kl_divergence(theirs, ours)
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
        max_diff, agree, positions = max(max_diff, diff), agree + int(top1.sum()), positions + len(top1)
        if not tokens:
            continue
        reference_next = theirs[len(prompt) - 1:].argmax(-1)
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference_next)) if a != b), len(tokens))
        per_prompt.append({"prompt_tokens": len(prompt), "max_abs_logit_diff": diff, "greedy_tokens_matched": prefix,
                           "top1_agreement": float(top1.mean()), "per_position": {  # for verify --plot
                               "max_abs_logit_diff": [float(f"{d:.4g}") for d in position_diff],
                               "top1_agrees": [bool(t) for t in top1], "kl": [float(f"{k:.4g}") for k in kl]}})
        compared, matched = compared + len(tokens), matched + prefix
        if log:
            log(f"  prompt {len(per_prompt)}: max |logit diff| {diff:.2e}, greedy {prefix}/{len(tokens)} tokens match")
    top1_agreement = agree / positions
    if non_finite:
        max_diff = float("nan")
    passed = non_finite is None
    if tolerance is not None:
        passed = passed and top1_agreement >= tolerance.min_top1_agreement
        if tolerance.max_abs_logit_diff is not None:
            passed = passed and max_diff <= max(tolerance.max_abs_logit_diff,
                                                tolerance.relative_logit_diff * largest_logit)
        if tolerance.all_greedy_tokens:
            passed = passed and matched == compared
    return {
        "passed": bool(passed),
        "max_abs_logit_diff": max_diff,
        "greedy_tokens_compared": compared,
        "greedy_tokens_matched": matched,
        "top1_agreement": top1_agreement,
        "positions_compared": positions,
        "mean_kl": kl_sum / positions,
        "max_kl": kl_max,
        "tolerance": None if tolerance is None else asdict(tolerance),
        "non_finite": non_finite,
        "prompts": per_prompt,
    }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))


def kl_divergence(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """KL(reference || package) per position, in nats (what llama.cpp's --kl-divergence reports)."""
    theirs_log, ours_log = log_softmax(reference), log_softmax(ours)
    return np.maximum((np.exp(theirs_log) * (theirs_log - ours_log)).sum(-1), 0.0)


def _perplexities(runs, references) -> dict | None:
    """Perplexity of the package and of the fp32 reference over the held-out text windows (each window predicts
    its tokens from the ones before it)."""
    windows = [(run, theirs) for run, theirs in zip(runs, references) if not run[1]]
    if not windows:
        return None
    ours_total, theirs_total, count = 0.0, 0.0, 0
    for (ids, _, ours), theirs in windows:
        ours = np.asarray(ours)
        targets = np.asarray(ids[1:])
        rows = np.arange(len(targets))
        ours_total -= float(log_softmax(ours[:-1])[rows, targets].sum())
        theirs_total -= float(log_softmax(theirs[:-1])[rows, targets].sum())
        count += len(targets)
    return {"package": safe_exp(ours_total / count), "reference": safe_exp(theirs_total / count), "tokens": count,
            "text": "exporter/data/heldout.txt"}


def safe_exp(x: float) -> float:
    """exp, infinite past float range (a model far from the text: random weights)."""
    return math.exp(x) if x < 709 else float("inf")


def _gates(quality: dict, gates: Gates) -> dict:
    failed = []
    if gates.min_top1 is not None and quality["top1_agreement"] < gates.min_top1:
        failed.append(f"top-1 agreement {quality['top1_agreement']:.3f} < --min-top1 {gates.min_top1}")
    if gates.max_kl is not None and quality["mean_kl"] > gates.max_kl:
        failed.append(f"mean KL divergence {quality['mean_kl']:.4f} > --max-kl {gates.max_kl}")
    return {"min_top1": gates.min_top1, "max_kl": gates.max_kl, "passed": not failed, "failed": failed}


def check_same_shape(package, checkpoint: Checkpoint) -> None:
    """The reference must be the package's model: another size cannot be compared logit for logit."""
    from llama_export.exporter.errors import UserError

    config = checkpoint.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pairs = {"layers": (package.num_layers, config.num_hidden_layers), "vocabulary": (package.vocab_size,
             config.vocab_size), "kv heads": (package.kv_heads, config.num_key_value_heads),
             "head size": (package.head_size, head_dim)}
    differ = [f"{what} {ours} vs {theirs}" for what, (ours, theirs) in pairs.items() if ours != theirs]
    if differ:
        raise UserError(f"{checkpoint.path} is not this package's model ({', '.join(differ)}); pass the source it "
                        "was exported from as --reference")


def _first_non_finite(logits: np.ndarray, whose: str, prompt_number: int) -> str | None:
    """Where a logit is NaN or Inf first: such logits compare as equal under max() and argmax(), so they are
    looked for on their own."""
    finite = np.isfinite(logits).all(-1)
    if finite.all():
        return None
    return f"{whose} logits are not finite (NaN or Inf) at prompt {prompt_number}, position {int(np.argmin(finite))}"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
