"""Quality of packages on the project's held-out texts, per kind (exporter/data/texts/heldout, never used for
calibration) and on exporter/data/heldout.txt: perplexity next to the fp32 PyTorch source's, the mean and max KL
divergence of the package's next-token distribution from the source's, top-1 agreement. The source's logits are
computed once (transformers, one layer at a time) and every package is compared with them."""

from __future__ import annotations

import tempfile
from pathlib import Path

HELDOUT = Path(__file__).resolve().parent.parent / "src" / "llama_export" / "exporter" / "data" / "heldout.txt"
WINDOW = 256


class HeldoutQuality:
    def __init__(self, source: Path, window: int = WINDOW):
        from llama_export.exporter import texts
        from llama_export.exporter.calibrate import tokenize
        from llama_export.exporter.evaluate import windows_of
        from llama_export.exporter.sources import open_checkpoint
        from llama_export.exporter.verify import StreamedReference

        checkpoint = open_checkpoint(source)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.write_tokenizer(Path(tmp))
            render = texts.chat_renderer(Path(tmp))
            named = {"heldout.txt": HELDOUT.read_text(encoding="utf-8")}
            named.update({kind: texts.read("heldout", kind, render) for kind in texts.KINDS})
        self.windows = {name: windows_of(tokenize(checkpoint, text), window) for name, text in named.items()}
        reference = StreamedReference(checkpoint)
        self.reference = {name: reference(w) for name, w in self.windows.items()}

    def of(self, package: Path) -> dict[str, dict]:
        """{text: scores} for a package (see exporter.evaluate.scores)."""
        from llama_export.exporter.evaluate import package_window_logits, scores

        return {name: scores(w, package_window_logits(package, w), self.reference[name])
                for name, w in self.windows.items()}


def report_quality(results: dict[str, dict[str, dict]], chart) -> None:
    """Perplexity change over fp32 and mean KL per package and text: a text table and its chart."""
    from bench._common import report_table

    names = list(next(iter(results.values())))
    first = next(iter(results.values()))
    header = ["package"] + [f"{n} {what}" for n in names for what in ("ppl vs fp32", "mean KL")]
    rows = [[package] + [cell for s in (by_text[n] for n in names)
                         for cell in (f"{(s['perplexity'] / s['reference_perplexity'] - 1) * 100:+.1f}%",
                                      f"{s['mean_kl']:.4f}")]
            for package, by_text in results.items()]
    report_table("held-out text; fp32 PyTorch perplexity: " + ", ".join(
        f"{n} {first[n]['reference_perplexity']:.2f}" for n in names), header, rows, chart)
