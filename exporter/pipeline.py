"""The export: open the source, trace, run the target's passes, write the package, verify, rename into place."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from exporter import __version__
from exporter.errors import UserError
from exporter.progress import Progress
from exporter.sources import Checkpoint, open_checkpoint
from passes import format_report, run_passes
from targets import get_target
from targets import package as pkg


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
    block_size: int = 32
    quant_method: str | None = None  # None: the default (gptq)
    symmetric: bool = False
    lm_head_bits: int | None = None  # None: chosen per block size
    quantize_embedding: bool = True


def resolve_model(model: str | None, log) -> Path:
    if model:
        return Path(model).expanduser()
    from exporter.default_model import default_model_path

    return default_model_path(log=log)


def default_output(checkpoint: Checkpoint, target: str, precision: str) -> Path:
    stem = checkpoint.name.split(".")[0].lower()
    return Path(f"{stem}-{target}-{precision}")


def export(options: ExportOptions) -> Path:
    target = get_target(options.target)
    precision = options.precision or target.default_precision
    target.check_precision(precision)
    progress = Progress(5 if options.verify else 4, quiet=options.quiet)
    if options.output is not None:
        pkg.check_output(options.output, options.force)

    progress.begin("Opening the model")
    checkpoint = open_checkpoint(resolve_model(options.model, progress.log))
    output = options.output or default_output(checkpoint, target.name, precision)
    pkg.check_output(output, options.force)
    config = checkpoint.config
    progress.end(f"{checkpoint.name} ({checkpoint.kind}), {config.num_hidden_layers} layers, "
                 f"{config.num_attention_heads}/{config.num_key_value_heads} q/kv heads, vocab {config.vocab_size}")

    from exporter.trace import trace_to_onnx

    progress.begin("Tracing with torch.onnx (dynamo, opset 23), weights not loaded")
    model = trace_to_onnx(checkpoint)
    progress.end(f"{sum(1 for _ in model.graph)} nodes")

    quant, hints = None, None
    if precision == "int4":
        quant, hints = quantization_plan(options, checkpoint, progress.log)

    progress.begin(f"Running the '{target.name}' passes ({precision})")
    reports = run_passes(model, target.pipeline(precision, config, quant, hints), log=progress.log)
    progress.end()
    if options.report:
        print(format_report(reports))

    with pkg.staged_package(output, options.force) as staging:
        progress.begin("Writing the package (weights streamed one tensor at a time)")
        pkg.save_model(model, staging, progress=progress.counter("weights"))
        io = pkg.io_dims(model)
        pkg.write_json(staging / "genai_config.json", pkg.genai_config(model, config))
        del model
        tokenizer_files = checkpoint.write_tokenizer(staging)
        if not tokenizer_files:
            progress.log("      note: the source has no tokenizer; `run` will need token ids")
        progress.end(f"{_size_mb(staging):.0f} MB")

        parity = {"skipped": True}
        if options.verify:
            from exporter.verify import verify_package

            progress.begin("Verifying against transformers (PyTorch, fp32)")
            parity = verify_package(staging, checkpoint, precision, new_tokens=options.verify_tokens,
                                    log=progress.log)
            progress.end("passed" if parity["passed"] else "FAILED")
            if not parity["passed"]:
                raise UserError(
                    f"the package does not match the PyTorch reference (max |logit diff| "
                    f"{parity['max_abs_logit_diff']:.2e}, greedy {parity['greedy_tokens_matched']}/"
                    f"{parity['greedy_tokens_compared']}, top-1 {parity['top1_agreement']:.3f}); nothing was written "
                    "(--no-verify writes it anyway)"
                )
        manifest = build_manifest(checkpoint, target.name, precision, staging, io, reports, parity)
        pkg.write_json(staging / pkg.MANIFEST, manifest)
    progress.log(f"Package written to {output}")
    return output


def quantization_plan(options: ExportOptions, checkpoint: Checkpoint, log):
    """The quantizer's options, and what it may use: the source's own blocks, calibration statistics."""
    from exporter.calibrate import SourceHints, collect_hessians, default_calibration_text, fully_prequantized
    from passes.quantize import DEFAULT_METHOD, QuantOptions

    method = options.quant_method or DEFAULT_METHOD
    # Measured on the default model at block 128: +15.4% perplexity over fp32 with a 4-bit lm_head, +13.3% with
    # an 8-bit one (which costs decode speed); at block 32 the 4-bit one is kept for size and speed.
    lm_head_bits = options.lm_head_bits or (8 if options.block_size >= 128 else 4)
    try:
        quant = QuantOptions(block_size=options.block_size, symmetric=options.symmetric, method=method,
                             lm_head_bits=lm_head_bits, quantize_embedding=options.quantize_embedding)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    hessians = None
    if method != "rtn" and not fully_prequantized(checkpoint, options.block_size):
        log(f"      calibrating on the built-in text ({method})")
        hessians = collect_hessians(checkpoint, default_calibration_text(), log=lambda m: None)
    return quant, SourceHints(checkpoint, hessians)


def build_manifest(checkpoint: Checkpoint, target: str, precision: str, folder: Path, io: dict, reports,
                   parity: dict) -> dict:
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
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
        "parity": parity,
    }


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
