"""Perplexity over fixed-length windows of a text, for a package (ONNX Runtime) or a source model (PyTorch,
transformers' LlamaForCausalLM in fp32), tokenized the same way so the two numbers compare."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llama_export.exporter.errors import UserError

DEFAULT_WINDOW = 256


def _perplexity(ids: list[int], window: int, logits_of, what: str, log=None) -> dict:
    """Non-overlapping windows; each predicts its tokens from the ones before it in the same window.
    `logits_of(window ids)` gives [len, vocab] logits."""
    chunks = [c for c in (ids[i:i + window] for i in range(0, len(ids), window)) if len(c) >= 2]
    if not chunks:
        raise UserError("the text is too short to evaluate (fewer than 2 tokens)")
    total, count = 0.0, 0
    for index, chunk in enumerate(chunks):
        logits = logits_of(chunk)[:-1].astype(np.float64)
        peak = logits.max(-1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
        total += float((log_norm - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        count += len(chunk) - 1
        if log:
            log(f"  window {index + 1}/{len(chunks)}")
    return {"perplexity": math.exp(total / count), "tokens": count, "windows": len(chunks), "window": window,
            "model": what}


def windows_of(ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of at least 2 tokens."""
    return [c for c in (ids[i:i + window] for i in range(0, len(ids), window)) if len(c) >= 2]


def package_window_logits(folder: Path, windows: list[list[int]]) -> list[np.ndarray]:
    """The package's logits [len, vocab] over each window, each prefilled alone (ONNX Runtime)."""
    from llama_export.runtimes import OnnxPackage
    from llama_export.runtimes.generate import Decoder

    package = OnnxPackage(folder)
    return [Decoder(package).prefill(w).astype(np.float32) for w in windows]


def scores(windows: list[list[int]], logits: list[np.ndarray], reference: list[np.ndarray] | None = None) -> dict:
    """Perplexity of `logits` over the windows (each predicts its tokens from the ones before it) and, against
    `reference` logits of the same windows, the reference's perplexity, the mean and max KL divergence per
    position (KL(reference || logits), nats) and the top-1 agreement."""
    from llama_export.exporter.verify import kl_divergence, log_softmax, safe_exp

    total, reference_total, count, kls, agree = 0.0, 0.0, 0, [], 0
    for ids, ours, theirs in zip(windows, logits, reference or [None] * len(windows)):
        targets, rows = np.asarray(ids[1:]), np.arange(len(ids) - 1)
        total -= float(log_softmax(ours[:-1])[rows, targets].sum())
        count += len(targets)
        if theirs is not None:
            reference_total -= float(log_softmax(theirs[:-1])[rows, targets].sum())
            kls.append(kl_divergence(theirs, ours))
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
    result = {"perplexity": safe_exp(total / count), "tokens": count, "windows": len(windows)}
    if reference is not None:
        kl = np.concatenate(kls)
        result.update(reference_perplexity=safe_exp(reference_total / count), mean_kl=float(kl.mean()),
                      max_kl=float(kl.max()), top1_agreement=agree / len(kl))
    return result


def is_package_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model.onnx").is_file()


def package_perplexity(folder: Path, text: str, window: int = DEFAULT_WINDOW, log=None) -> dict:
    from llama_export.runtimes import OnnxPackage
    from llama_export.runtimes.generate import Decoder
    from llama_export.runtimes.tokenizer import PackageTokenizer

    package = OnnxPackage(folder)
    if package.context_length and window > package.context_length:
        raise UserError(f"--window {window} is longer than the package's context of {package.context_length}; "
                        f"use --window {package.context_length} or less")
    ids = PackageTokenizer(folder).tokenizer.encode(text, add_special_tokens=False).ids
    return _perplexity(ids, window, lambda chunk: Decoder(package).prefill(chunk), str(folder), log)


def source_perplexity(source: str, text: str, window: int = DEFAULT_WINDOW, log=None) -> dict:
    import torch

    from llama_export.exporter.calibrate import tokenize
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import reference_model

    checkpoint = open_checkpoint(Path(source).expanduser())
    positions = checkpoint.config.max_position_embeddings
    if window > positions:
        raise UserError(f"--window {window} is longer than the model's {positions} positions; use --window "
                        f"{positions} or less")
    ids = tokenize(checkpoint, text)
    model = reference_model(checkpoint)
    with torch.no_grad():
        return _perplexity(ids, window, lambda chunk: model(torch.tensor([chunk])).logits[0].float().numpy(),
                           f"{source} (PyTorch fp32)", log)
