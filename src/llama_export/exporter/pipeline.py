"""The export: resolve the source and the output, build the package in a staging folder (exporter/build.py),
convert it or add the target's engine material, verify it, and rename it into place."""

from __future__ import annotations

import contextlib
import datetime
import shutil
from dataclasses import dataclass
from pathlib import Path

from llama_export.exporter import __version__, export_memory
from llama_export.exporter.errors import UserError
from llama_export.exporter.progress import Progress
from llama_export.exporter.signals import raise_if_terminated
from llama_export.exporter.sources import Checkpoint, check_source_path
from llama_export.exporter.verify import Gates
from llama_export.targets import get_target
from llama_export.targets import package as pkg
from llama_export.targets.mobile import convert_to_ort
from llama_export.targets.plan import GIB


@dataclass
class ExportOptions:
    model: str | None  # None: the built-in default model
    target: str = "cpu"
    output: Path | None = None
    precision: str | None = None
    force: bool = False
    verify: bool = True
    verify_tokens: int = 32
    report: bool = False
    quiet: bool = False
    block_size: int | None = None  # None: the target's default
    context: int | None = None  # None: the model's, capped at 4096
    quant_method: str | None = None  # None: the default (gptq)
    calibration_text: Path | None = None  # None: the built-in set (exporter/data/texts/calibration)
    calibration_tokens: int | None = None  # None: exporter.calibrate.CALIBRATION_TOKENS
    symmetric: bool = False
    lm_head_bits: int | None = None  # None: chosen per block size
    quantize_embedding: bool = True
    requantize: bool = False  # quantize every matrix here, even where the source's blocks could be carried
    gates: Gates = Gates()  # verify's opt-in quality gates


def resolve_model(model: str | None, log) -> Path:
    if model:
        return Path(model).expanduser()
    from llama_export.exporter.default_model import default_model_path

    return default_model_path(log=log)


def default_output(source: Path, target: str, precision: str) -> Path:
    """NAME-TARGET-PRECISION beside the current folder, NAME from the folder's name or the GGUF file's."""
    name = source.name if source.is_dir() else source.stem
    return Path(f"{name.split('.')[0].lower()}-{target}-{precision}")


def export(options: ExportOptions) -> Path:
    with contextlib.ExitStack() as claims:
        return _export(options, claims)


def _export(options: ExportOptions, claims: contextlib.ExitStack) -> Path:
    target = get_target(options.target)
    precision = options.precision or target.default_precision
    target.check_precision(precision)
    if target.uses_tensorrt and options.lm_head_bits is not None:
        raise UserError(f"target '{target.name}' keeps the lm_head in fp16 (--lm-head-bits is for the cpu target)")
    progress = Progress(5 if options.verify else 4, quiet=options.quiet)
    if options.output is not None:
        pkg.check_output(options.output, options.force)
    source = resolve_model(options.model, progress.log)
    check_source_path(source)
    output = options.output or default_output(source, target.name, precision)
    pkg.check_output(output, options.force)
    claims.enter_context(pkg.output_lock(output))

    with pkg.staged_package(output, options.force) as staging:
        if builds_elsewhere(source):
            from llama_export.exporter.build_process import build_elsewhere as build
        else:
            from llama_export.exporter.build import build
        built = build(options, source, staging, progress)
        if built.report is not None:
            print(built.report)

        ort_format, graph = None, staging
        if target.package_format == "ort":
            progress.log("      converting to the ORT format (ONNX Runtime Mobile)")
            graph = staging / ONNX_GRAPH_FOR_VERIFY if options.verify else None
            ort_format = convert_to_ort(staging, built.weight_bytes, log=progress.log, keep_graph_in=graph)

        tensorrt = None
        if target.uses_tensorrt:
            tensorrt = tensorrt_material(staging, target, built.io, built.context, built.vocab_size, progress)
            export_memory.hand_back_freed_memory()

        parity = {"skipped": True}
        if options.verify:
            parity = verify(staging, graph, source, precision, options, progress)
            if graph != staging:
                shutil.rmtree(graph)
        manifest = {**built.manifest, "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())
                                                if p.is_file()}, "parity": parity}
        if tensorrt is not None:
            manifest["tensorrt"] = tensorrt
        if ort_format is not None:
            manifest["ort_format"] = ort_format
        pkg.write_json(staging / pkg.MANIFEST, manifest)
        raise_if_terminated()  # a SIGTERM Python dropped (see exporter/signals.py) still stops the swap
    progress.log(f"Package written to {output}")
    return output


# Sources this large are built in a process of their own (exporter/build.py): the memory the build used is then
# free before the package runs. Below it one process is quicker (no second start of PyTorch) and holds little.
SEPARATE_BUILD_BYTES = 1 << 30


def builds_elsewhere(source: Path) -> bool:
    try:
        files = [p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source]
        return sum(p.stat().st_size for p in files) >= SEPARATE_BUILD_BYTES
    except OSError:
        return False  # the build reports what cannot be read


# An ORT-format package's ONNX files, kept in the staging folder until verify has read its weights back from them.
ONNX_GRAPH_FOR_VERIFY = "onnx-graph"


def verify(staging: Path, graph: Path, source: Path, precision: str, options: ExportOptions, progress) -> dict:
    """The package runs its sequences before PyTorch is loaded here (a separate build leaves this process without
    it), then transformers' references run over the same tokens. `graph`: the folder with the package's
    model.onnx (the staging folder, or where an ORT-format package's ONNX files were kept)."""
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import compare_with_reference, runs_for_verify

    progress.begin("Verifying against transformers (PyTorch, fp32)")
    runs, exact_runs = runs_for_verify(staging, precision, options.verify_tokens, graph=graph)
    parity = compare_with_reference(runs, open_checkpoint(source), precision, log=progress.log, folder=graph,
                                    exact_runs=exact_runs, gates=options.gates)
    progress.end("passed" if parity["passed"] else "FAILED")
    if parity["non_finite"]:
        raise UserError(f"{parity['non_finite']}; nothing was written")
    if not parity["passed"]:
        raise UserError(f"{failure(parity)}; nothing was written (--no-verify writes it anyway)")
    return parity


def failure(parity: dict) -> str:
    """What of verify's result failed, in one line."""
    exactness, failed = parity["exactness"], parity["quality"]["gates"]["failed"]
    if not exactness["passed"]:
        weights = exactness.get("weights")
        if weights and not weights["passed"] and weights["furthest_row"]:
            row = weights["furthest_row"]
            return (f"the package's weight '{row['tensor']}' is not a quantization of the source's (row {row['row']} "
                    f"is {weights['largest_row_distance']:.2f} of its size away from it; at most "
                    f"{weights['row_bound']} is)")
        if not exactness["checked"]:
            return (f"the package does not match the PyTorch reference (top-1 {parity['top1_agreement']:.3f} "
                    f"with the fp32 source)")
        return (f"the package does not compute what PyTorch computes with {exactness['reference']} (max |logit "
                f"diff| {exactness['max_abs_logit_diff']:.2e}, greedy {exactness['greedy_tokens_matched']}/"
                f"{exactness['greedy_tokens_compared']}, top-1 {exactness['top1_agreement']:.3f})")
    return ("the package's quality is below what was asked: " + "; ".join(failed) +
            " (a smaller --block-size or --quant method keeps more of the model)")


def check_export_memory(options: ExportOptions, config, precision: str, checkpoint: Checkpoint, block_size: int,
                        target, log) -> None:
    """Print what the export will need at its peak and refuse, before the long steps, when it is not free."""
    from llama_export.exporter.calibrate import fully_prequantized
    from llama_export.passes.quantize import DEFAULT_METHOD

    method = options.quant_method or DEFAULT_METHOD
    carried = fully_prequantized(checkpoint, carried_block_size(options, block_size),
                                 bits=(4,) if target.uses_tensorrt else (4, 8), layers_only=target.uses_tensorrt)
    calibrated = precision == "int4" and method != "rtn" and not carried
    # Tables that stay float are written in row chunks (passes/streamed.py) where the source reads rows alone.
    tables = [checkpoint.weights.get(name) for name in ("model.embed_tokens.weight", "lm_head.weight")]
    read_whole = any(table is not None and table.load_rows is None for table in tables)
    float_tables = read_whole and (precision != "int4" or target.uses_tensorrt or not options.quantize_embedding)
    int4_bytes = max(export_memory.INT4_BYTES, export_memory.carried_bytes_per_weight(checkpoint) or 0)
    need = export_memory.estimate(config, precision, calibrated, options.verify, float_tables, int4_bytes).peak
    free = export_memory.available_bytes()
    log(f"      export memory: about {need / GIB:.1f} GiB at the peak"
        + (f" ({free / GIB:.1f} GiB free)" if free is not None else ""))
    if free is not None and need > free:
        hints = ["close other programs"]
        if calibrated:
            rtn = export_memory.estimate(config, precision, False, options.verify, float_tables).peak
            hints.append(f"--quant rtn (about {rtn / GIB:.1f} GiB)")
        if options.verify:
            hints.append("--no-verify")
        raise UserError(f"this export needs about {need / GIB:.1f} GiB of memory and {free / GIB:.1f} GiB are free: "
                        f"{', '.join(hints)}, or export on a machine with more memory")


def tensorrt_material(folder: Path, target, io: dict, context: int, vocab_size: int, progress) -> dict:
    """Profiles, build and check scripts, reference outputs; the engine too where TensorRT and a GPU are here."""
    from llama_export.runtimes.reference_steps import run_reference_steps
    from llama_export.targets import engine

    progress.log("      writing engine build material (profiles, build_engine.py/.sh, reference outputs)")
    spec = engine.write_build_material(folder, io, context, target.platform)
    arrays, inputs, runtime = run_reference_steps(folder / "model.onnx", io, engine.reference_ids(vocab_size))
    engine.write_reference(folder, arrays, inputs, runtime)
    info = {"parser": target.tensorrt.version, "requires": target.platform, "opset": target.tensorrt.opset,
            "context": context, "profiles": [p["name"] for p in spec["profiles"]], "engine": None}
    missing = engine.tensorrt_available()
    if missing is None:
        progress.log("      building the TensorRT engine on this GPU")
        info["engine"] = engine.build_engine_here(folder, log=progress.log)
    else:
        info["engine_not_built"] = f"{missing}: build it on the device with build_engine.sh or build_engine.py"
        progress.log(f"      engine not built here ({missing}); the package carries the build scripts")
    return info


def carried_block_size(options: ExportOptions, block_size: int) -> int | None:
    """The block size a source's own blocks must have to be carried over: any (None) unless --block-size asks for
    one (a GGUF K-quant file's 16- and 32-blocks are kept as they are)."""
    return None if options.block_size is None else block_size


def default_block_size(target, checkpoint: Checkpoint) -> int:
    """The target's, except on TensorRT targets for a GGUF whose matrices are all 4-bit blocks (Q4_0/Q4_1): those
    are carried over exactly at their block size (32). Requantizing them to block 128 compounds two roundings:
    measured on the default model, verify's top-1 agreement fell to 0.80 with GPTQ at block 128."""
    from llama_export.exporter.calibrate import fully_prequantized

    if target.uses_tensorrt and fully_prequantized(checkpoint, 32, bits=(4,), layers_only=True):
        return 32
    return target.default_block_size


# The cpu target's lm_head by default: the first rows (a BPE vocabulary's frequent tokens) at 8 bits, the rest at 4,
# nearly an 8-bit head's quality at nearly a 4-bit head's decode speed (README, INT4: layout measurements).
FREQUENT_LM_HEAD_ROWS = 16384
EDGE_LAYER_BLOCK = 32
# From this block size up the cpu target lays INT4 out for speed, as onnxruntime-genai's builder does: every layer
# matrix 4-bit in the layers' blocks, no edge layers; the lm_head and its tied table 8-bit in 64-blocks, which on
# text the calibration never saw lost least of every layout measured (README, INT4 methods table).
FAST_LAYOUT_BLOCK = 128
FAST_LAYOUT_LM_HEAD_BITS = 8


def lm_head_bits(options: ExportOptions, block_size: int) -> int:
    """An lm_head at one width (targets that take no split): 8-bit from block 128 up, where a 4-bit one loses most
    (README, INT4: layout measurements); at block 32 a 4-bit one is kept for size and speed."""
    return options.lm_head_bits or (8 if block_size >= 128 else 4)


def splits_lm_head(options: ExportOptions, vocab_size: int) -> bool:
    """Unless a width is asked for, and where the vocabulary has rows left over for 4 bits."""
    return options.lm_head_bits is None and vocab_size > FREQUENT_LM_HEAD_ROWS


def edge_layers(num_layers: int) -> tuple[int, ...]:
    """The first and last decoder layers, whose matrices the MatMulNBits form keeps in 32-blocks where the other
    layers' are larger: the two whose error costs most for the bits (README, INT4: first and last decoder layers).
    Only where the two are at most a quarter of the layers, so --block-size still sets the bulk.
    The cpu target leaves them out from FAST_LAYOUT_BLOCK up (see quantization_plan)."""
    return (0, num_layers - 1) if num_layers >= 8 else ()


def edge_layer_weights(checkpoint: Checkpoint) -> frozenset[str]:
    """The edge layers' 2-D weights, by checkpoint name."""
    prefixes = tuple(f"model.layers.{i}." for i in edge_layers(checkpoint.config.num_hidden_layers))
    return frozenset(name for name, info in checkpoint.weights.items()
                     if len(info.shape) == 2 and name.startswith(prefixes))


def quantization_plan(options: ExportOptions, block_size: int, checkpoint: Checkpoint, log, tensorrt: bool = False,
                      cpu: bool = False):
    """The quantizer's options, and what it may use: the source's own blocks, calibration statistics when some
    matrix must be quantized here (TensorRT carries 4-bit blocks only, and keeps embedding and lm_head float).
    `cpu`: the cpu target's layouts: below block 128 the lm_head split into frequent rows at 8 bits and the rest
    at 4; at 128 and above the fast layout (see FAST_LAYOUT_BLOCK)."""
    from llama_export.exporter.calibrate import (
        CalibrationStream,
        SourceHints,
        calibration_text,
        fully_prequantized,
        read_calibration_text,
    )
    from llama_export.passes.quantize import DEFAULT_METHOD, QuantOptions

    method = options.quant_method or DEFAULT_METHOD
    fast = cpu and block_size >= FAST_LAYOUT_BLOCK
    split = cpu and not fast and splits_lm_head(options, checkpoint.config.vocab_size)
    head_bits = 4 if split else (options.lm_head_bits or FAST_LAYOUT_LM_HEAD_BITS) if fast else \
        lm_head_bits(options, block_size)
    head_block = None if fast else QuantOptions.lm_head_block_size  # None: the layers' blocks
    try:
        quant = QuantOptions(block_size=block_size, symmetric=options.symmetric, method=method,
                             lm_head_bits=head_bits, lm_head_block_size=head_block,
                             lm_head_frequent_rows=FREQUENT_LM_HEAD_ROWS if split else 0,
                             quantize_embedding=options.quantize_embedding,
                             sensitive_weights=frozenset() if fast else edge_layer_weights(checkpoint),
                             sensitive_block_size=EDGE_LAYER_BLOCK,
                             carry_any_source_blocks=options.block_size is None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    hessians = None
    carried_blocks = carried_block_size(options, block_size)
    carried = fully_prequantized(checkpoint, carried_blocks, bits=(4,), layers_only=True) if tensorrt else \
        fully_prequantized(checkpoint, carried_blocks)
    if method != "rtn" and not carried:
        text = read_calibration_text(options.calibration_text) if options.calibration_text else \
            calibration_text(checkpoint)
        log(f"      calibrating on {options.calibration_text or 'the built-in texts'} ({method}), one decoder layer "
            "at a time as the package is written")
        hessians = CalibrationStream(checkpoint, text, log=log, tokens=options.calibration_tokens)
    return quant, SourceHints(checkpoint, hessians)


def build_manifest(checkpoint, target: str, precision: str, io: dict, reports) -> dict:
    """The manifest but for its files and parity, added once the package is complete."""
    config = checkpoint.config
    return {
        "tool": pkg.TOOL,
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "precision": precision,
        "source": {
            "kind": checkpoint.kind,
            "name": checkpoint.name,
            "path": str(checkpoint.path.resolve()),
            "content_hash": checkpoint.content_hash(),
        },
        "model": {
            "architecture": "llama",
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "context_length": config.max_position_embeddings,
            "tie_word_embeddings": bool(config.tie_word_embeddings),
            "rope_parameters": dict(config.rope_parameters or {}),
        },
        "io": io,
        "passes": [r.as_dict() for r in reports],
    }
