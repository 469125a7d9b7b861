"""Perplexity over fixed-length windows of a text, for a package (ONNX Runtime) or a source model (PyTorch,
transformers' LlamaForCausalLM in fp32), tokenized the same way so the two numbers compare."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from exporter.errors import UserError

DEFAULT_WINDOW = 256


def _windows(ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows; each predicts its tokens from the ones before it in the same window."""
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [c for c in chunks if len(c) >= 2]


def _nll(logits: np.ndarray, targets: list[int]) -> float:
    logits = logits.astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
    return float((log_norm - logits[np.arange(len(targets)), targets]).sum())


def _result(total_nll: float, tokens: int, windows: int, window: int, what: str) -> dict:
    return {"perplexity": math.exp(total_nll / tokens), "tokens": tokens, "windows": windows, "window": window,
            "model": what}


def is_package_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model.onnx").is_file()


def package_perplexity(folder: Path, text: str, window: int = DEFAULT_WINDOW, log=None) -> dict:
    from runtimes import OnnxPackage
    from runtimes.generate import Decoder
    from runtimes.tokenizer import PackageTokenizer

    package = OnnxPackage(folder)
    ids = PackageTokenizer(folder).tokenizer.encode(text, add_special_tokens=False).ids
    chunks = _windows(ids, window)
    if not chunks:
        raise UserError("the text is too short to evaluate (fewer than 2 tokens)")
    total, count = 0.0, 0
    for index, chunk in enumerate(chunks):
        logits = Decoder(package).prefill(chunk)
        total += _nll(logits[:-1], chunk[1:])
        count += len(chunk) - 1
        if log:
            log(f"  window {index + 1}/{len(chunks)}")
    return _result(total, count, len(chunks), window, str(folder))


def source_perplexity(source: str, text: str, window: int = DEFAULT_WINDOW, log=None) -> dict:
    import torch
    from tokenizers import Tokenizer

    from exporter.sources import open_checkpoint
    from exporter.verify import reference_model

    checkpoint = open_checkpoint(Path(source).expanduser())
    with tempfile.TemporaryDirectory() as tmp:
        if "tokenizer.json" not in checkpoint.write_tokenizer(Path(tmp)):
            raise UserError(f"{source}: the source has no tokenizer")
        ids = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    chunks = _windows(ids, window)
    if not chunks:
        raise UserError("the text is too short to evaluate (fewer than 2 tokens)")
    model = reference_model(checkpoint)
    total, count = 0.0, 0
    with torch.no_grad():
        for index, chunk in enumerate(chunks):
            logits = model(torch.tensor([chunk])).logits[0].float().numpy()
            total += _nll(logits[:-1], chunk[1:])
            count += len(chunk) - 1
            if log:
                log(f"  window {index + 1}/{len(chunks)}")
    return _result(total, count, len(chunks), window, f"{source} (PyTorch fp32)")
