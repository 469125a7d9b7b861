"""The export: resolve the source and the output, build the package in a staging folder (exporter/build.py),
let the target finish it (ORT conversion, engine material), verify it, and rename it into place."""

from __future__ import annotations

import contextlib
import datetime
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from llama_export.exporter import __version__, export_memory
from llama_export.exporter.errors import UserError
from llama_export.exporter.progress import Progress
from llama_export.exporter.signals import raise_if_terminated
from llama_export.exporter.sources import Checkpoint, check_source_path
from llama_export.exporter.verify import Gates
from llama_export.targets import Finishing, get_target
from llama_export.targets import package as pkg
from llama_export.targets.plan import GIB
from llama_export.targets.presets import QuantPreset, edge_layer_weights


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
    eight_bit_share: float | None = None  # at most this share of the layer weights at 8 bits (None: the target's)
    gates: Gates = Gates()  # verify's opt-in quality gates
    lora: tuple = ()  # (adapter folder, weight) pairs merged into the weights
    runtime_lora: tuple = ()  # adapter folders the package takes at run time (cpu, fp32)
    layout: str = "genai"  # "optimum": no GroupQueryAttention, for Optimum's loop and padded batches (cpu)


def resolve_model(model: str | None, log) -> Path:
    if model:
        return Path(model).expanduser()
    from llama_export.exporter.default_model import default_model_path

    return default_model_path(log=log)


def default_output(source: Path, target: str, precision: str) -> Path:
    """NAME-TARGET-PRECISION beside the current folder, NAME from the folder's name or the GGUF file's."""
    name = source.name if source.is_dir() else source.stem
    return Path(f"{name.split('.')[0].lower()}-{target}-{precision}")


@dataclass
class ExportResult:
    """A finished export: the package folder, its manifest (files, parity), and each step's seconds and the
    peak memory of the process it ran in by its end."""

    package: Path
    manifest: dict
    stages: list
    seconds: float

    def as_dict(self) -> dict:
        files = self.manifest.get("files", {})
        return {"package": str(self.package.resolve()), "target": self.manifest["target"],
                "precision": self.manifest["precision"], "files": files, "total_bytes": sum(files.values()),
                "seconds": round(self.seconds, 2), "stages": self.stages,
                "peak_memory_gb": max((stage["peak_memory_gb"] or 0 for stage in self.stages), default=None),
                "parity": self.manifest.get("parity")}


def export(options: ExportOptions) -> Path:
    return export_package(options).package


def export_package(options: ExportOptions) -> ExportResult:
    started = time.perf_counter()
    with contextlib.ExitStack() as claims:
        package, manifest, stages = _export(options, claims)
    return ExportResult(package, manifest, stages, time.perf_counter() - started)


def _export(options: ExportOptions, claims: contextlib.ExitStack) -> tuple[Path, dict, list]:
    target = get_target(options.target)
    precision = options.precision or target.default_precision
    check_options(options, precision)
    target.check_request(precision, options.lm_head_bits)
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
        finished = target.finish(Finishing(staging, built.io, built.context, built.vocab_size, built.weight_bytes,
                                           keep_graph=options.verify, log=progress.log,
                                           run_reference_steps=run_reference_steps))
        export_memory.hand_back_freed_memory()
        parity = {"skipped": True}
        if options.verify:
            parity = verify(staging, finished.graph, source, precision, options, progress)
        if finished.graph not in (None, staging):
            shutil.rmtree(finished.graph)
        manifest = {**built.manifest, "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())
                                                if p.is_file()}, "parity": parity, **finished.manifest}
        pkg.write_json(staging / pkg.MANIFEST, manifest)
        raise_if_terminated()  # a SIGTERM Python dropped (see exporter/signals.py) still stops the swap
    progress.log(f"Package written to {output}")
    return output, manifest, progress.stages


def check_options(options: ExportOptions, precision: str) -> None:
    """Options that apply to some precisions or targets only (named as the CLI's flags)."""
    int4_only = {"--block-size": options.block_size, "--quant": options.quant_method, "--symmetric": options.symmetric,
                 "--calibration-text": options.calibration_text, "--calibration-tokens": options.calibration_tokens,
                 "--lm-head-bits": options.lm_head_bits, "--keep-embedding": not options.quantize_embedding,
                 "--requantize": options.requantize, "--eight-bit-share": options.eight_bit_share is not None}
    given = [flag for flag, value in int4_only.items() if value]
    if given and precision != "int4":
        raise UserError(f"{', '.join(given)} applies to --precision int4 only")
    if options.layout not in ("genai", "optimum"):
        raise UserError(f"unknown layout '{options.layout}'; choose genai or optimum")
    if options.layout == "optimum" and options.target != "cpu":
        raise UserError("--layout optimum is for --target cpu (Optimum's ORTModelForCausalLM runs ONNX Runtime)")
    if options.runtime_lora and (options.target != "cpu" or precision != "fp32"):
        raise UserError("--runtime-lora needs --target cpu --precision fp32 (quantized and TensorRT packages take "
                        "adapters merged: --lora)")


def run_reference_steps(model_path: Path, io: dict, ids: list[int]):
    """The package's outputs for a target's reference material (TensorRT's engine check), run by ONNX Runtime."""
    from llama_export.runtimes.reference_steps import run_reference_steps as run

    return run(model_path, io, ids)


# Sources this large are built in a process of their own (exporter/build.py): the memory the build used is then
# free before the package runs. Below it one process is quicker (no second start of PyTorch) and holds little.
SEPARATE_BUILD_BYTES = 1 << 30


def builds_elsewhere(source: Path) -> bool:
    try:
        files = [p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source]
        return sum(p.stat().st_size for p in files) >= SEPARATE_BUILD_BYTES
    except OSError:
        return False  # the build reports what cannot be read


def verify(staging: Path, graph: Path, source: Path, precision: str, options: ExportOptions, progress) -> dict:
    """The package runs its sequences before PyTorch is loaded here (a separate build leaves this process without
    it), then transformers' references run over the same tokens. `graph`: the folder with the package's
    model.onnx (the staging folder, or where an ORT-format package's ONNX files were kept)."""
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import compare_with_reference, runs_for_verify

    progress.begin("Verifying against transformers (PyTorch, fp32)")
    runs, exact_runs = runs_for_verify(staging, precision, options.verify_tokens, graph=graph)
    parity = compare_with_reference(runs, open_checkpoint(source, options.lora), precision,
                                    log=progress.log, folder=graph,
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
                        preset: QuantPreset, log) -> None:
    """Print what the export will need at its peak and refuse, before the long steps, when it is not free."""
    from llama_export.passes.quantize import DEFAULT_METHOD

    method = options.quant_method or DEFAULT_METHOD
    quantized_here = precision == "int4" and not carried(checkpoint, preset, carried_block_size(options, block_size))
    calibrated = quantized_here and method != "rtn"
    # Tables that stay float are written in row chunks (passes/streamed.py) where the source reads rows alone.
    tables = [checkpoint.weights.get(name) for name in ("model.embed_tokens.weight", "lm_head.weight")]
    read_whole = any(table is not None and table.load_rows is None for table in tables)
    float_tables = read_whole and (precision != "int4" or not preset.quantize_embedding
                                   or not options.quantize_embedding)
    int4_bytes = max(export_memory.INT4_BYTES, export_memory.carried_bytes_per_weight(checkpoint) or 0)
    if preset.eight_bit_share:  # a layer weight's bytes on average, with the 8-bit share
        int4_bytes = max(int4_bytes, preset.layer_bytes(1, config.num_hidden_layers, block_size))
    need = export_memory.estimate(config, precision, calibrated, options.verify, float_tables, int4_bytes,
                                  options.calibration_tokens,
                                  eight_bit_choice=quantized_here and bool(preset.eight_bit_share)).peak
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


def carried(checkpoint: Checkpoint, preset: QuantPreset, block_size: int | None) -> bool:
    """Every matrix the preset quantizes is already in blocks the preset can carry over: nothing to calibrate."""
    from llama_export.exporter.calibrate import fully_prequantized

    return fully_prequantized(checkpoint, block_size, bits=preset.carried_bits, layers_only=preset.carried_layers_only)


def carried_block_size(options: ExportOptions, block_size: int) -> int | None:
    """The block size a source's own blocks must have to be carried over: any (None) unless --block-size asks for
    one (a GGUF K-quant file's 16- and 32-blocks are kept as they are)."""
    return None if options.block_size is None else block_size


SOURCE_BLOCK = 32  # Q4_0/Q4_1 and the other 32-block formats


def default_block_size(target, checkpoint: Checkpoint) -> int:
    """The target's, except for a source whose matrices are all in 32-blocks the target's preset can carry (a
    Q4_0/Q4_1 GGUF on a TensorRT target): those are carried over exactly. Requantizing them to block 128 compounds
    two roundings: measured on the default model, verify's top-1 agreement fell to 0.80 with GPTQ at block 128."""
    if carried(checkpoint, target.int4_preset(SOURCE_BLOCK), SOURCE_BLOCK):
        return SOURCE_BLOCK
    return target.default_block_size


def quantization_plan(options: ExportOptions, block_size: int, checkpoint: Checkpoint, preset: QuantPreset, log):
    """The quantizer's options, from the target's (settled) preset and the user's options, and what it may use:
    the source's own blocks, calibration statistics when some matrix must be quantized here."""
    from llama_export.exporter.calibrate import (
        CalibrationStream,
        SourceHints,
        calibration_text,
        carried_over,
        read_calibration_text,
    )
    from llama_export.passes.quantize import DEFAULT_METHOD

    method = options.quant_method or DEFAULT_METHOD
    source_block = carried_block_size(options, block_size)
    quantized_here = not carried(checkpoint, preset, source_block)
    text = None
    if quantized_here and (method != "rtn" or preset.eight_bit_share):
        text = read_calibration_text(options.calibration_text) if options.calibration_text else \
            calibration_text(checkpoint)
    try:
        quant = preset.quant_options(block_size, method, options.symmetric, options.quantize_embedding,
                                     edge_layer_weights(checkpoint.weights, checkpoint.config.num_hidden_layers),
                                     carry_any_source_blocks=options.block_size is None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if preset.eight_bit_share and not quantized_here and options.eight_bit_share:
        raise UserError(f"--eight-bit-share: every matrix of {checkpoint.path} is carried over in its own blocks, so "
                        "none is quantized here; add --requantize to choose 8-bit matrices")
    if preset.eight_bit_share and quantized_here:
        carried_weights = {name for name, info in checkpoint.weights.items()
                           if carried_over(info, source_block, preset.carried_bits)}
        quant = replace(quant, eight_bit_weights=choose_eight_bit(checkpoint, text, quant, preset.eight_bit_share,
                                                                  carried_weights, options, log))
    hessians = None
    if method != "rtn" and quantized_here:
        log(f"      calibrating on {options.calibration_text or 'the built-in texts'} ({method}), one decoder layer "
            "at a time as the package is written")
        hessians = CalibrationStream(checkpoint, text, log=log, tokens=options.calibration_tokens)
    return quant, SourceHints(checkpoint, hessians)


def choose_eight_bit(checkpoint: Checkpoint, text: str, quant, share: float, carried_weights: set[str],
                     options: ExportOptions, log) -> frozenset[str]:
    """The layer matrices kept at 8 bits: the most sensitive within `share` of the layer weights, among those
    quantized here (a matrix whose own blocks are carried over keeps them)."""
    from llama_export.exporter.sensitivity import eight_bit_weights, sensitivities

    log(f"      choosing the matrices kept at 8 bits (up to {share:.0%} of the layer weights) by their 4-bit error's "
        f"cost on {options.calibration_text or 'the built-in texts'}, one decoder layer at a time")
    groups = sensitivities(checkpoint, text, quant.block_size, quant.symmetric, log=log)
    chosen = eight_bit_weights(groups, share, exclude=carried_weights)
    total = sum(g.weights for g in groups)
    kept = sum(g.weights for g in groups if set(g.names) <= chosen)
    log(f"      8 bits for {len(chosen)} of {sum(len(g.names) for g in groups)} layer matrices "
        f"({kept / total:.1%} of the layer weights)")
    return chosen


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
            "lora": checkpoint.adapters,
        },
        "model": {
            "architecture": checkpoint.family.name,
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
