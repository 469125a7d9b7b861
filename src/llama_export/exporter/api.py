"""The Python API: `export`, `verify` and `load`, re-exported by the `llama_export` package. They return results
and raise LlamaExportError (UserError, PackageError, TargetError) with a one-line message; nothing exits."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

from llama_export.exporter.errors import UserError


def export(model: str | Path | None = None, target: str = "cpu", output: str | Path | None = None,
           precision: str | None = None, *, progress: bool = False, lora=(), runtime_lora=(),
           min_top1: float | None = None, max_kl: float | None = None, **options):
    """Export `model` (a Hugging Face or Meta folder, a .gguf file; None: the default model) for `target` and
    verify it; returns an ExportResult (.package, .manifest, .stages, .seconds, .as_dict()). `progress` prints
    the steps and bars on stderr. Other keywords are ExportOptions' fields (block_size, quant_method, context,
    verify, force, layout, ...); `lora` takes folders or (folder, weight) pairs, `runtime_lora` folders;
    `min_top1` and `max_kl` are verify's quality gates."""
    from llama_export.exporter.pipeline import ExportOptions, export_package
    from llama_export.exporter.sources.lora import parse_adapter
    from llama_export.exporter.verify import Gates

    types = {f.name: f.type for f in fields(ExportOptions)}
    known = set(types) - {"model", "target", "output", "precision", "quiet", "lora", "runtime_lora", "gates"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"export() got unknown option {unknown[0]!r}; options: {', '.join(sorted(known))}")
    options = {name: _checked(name, value, types[name]) for name, value in options.items()}
    if isinstance(lora, (str, Path)):
        lora = [lora]
    if isinstance(runtime_lora, (str, Path)):
        runtime_lora = [runtime_lora]
    try:
        adapters = tuple(parse_adapter(str(a)) if isinstance(a, (str, Path)) else (str(a[0]), float(a[1]))
                         for a in lora)
    except (TypeError, ValueError, IndexError):
        raise UserError("lora: give adapter folders or (folder, weight) pairs") from None
    return export_package(ExportOptions(
        model=None if model is None else str(model), target=target, precision=precision,
        output=None if output is None else Path(output), quiet=not progress, lora=adapters,
        runtime_lora=tuple(Path(p).expanduser() for p in runtime_lora), gates=Gates(min_top1, max_kl), **options))


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "Path": (str, Path), "str": (str,)}


def _checked(name: str, value, annotation: str):
    """An option's value checked against ExportOptions' annotation (a string: postponed); a path given as str
    becomes a Path."""
    if value is None and "None" in annotation:
        return None
    kinds = _KINDS.get(annotation.replace(" | None", ""))
    if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise UserError(f"export() option {name}={value!r}: expected {annotation}")
    return Path(value) if annotation.startswith("Path") else value


def verify(package: str | Path, reference: str | Path | None = None, tokens: int = 32, min_top1: float | None = None,
           max_kl: float | None = None, log=None) -> dict:
    """Compare a package with transformers running its source model (`reference`, default: the source its
    manifest names, with the LoRA adapters it merged): the result verify --json writes; result["passed"] tells."""
    from llama_export.exporter.sources import open_checkpoint
    from llama_export.exporter.verify import TOLERANCES, Gates, check_same_shape, verify_package
    from llama_export.runtimes.onnx_package import PackageLayout
    from llama_export.targets.package import MANIFEST, is_package

    package = Path(package)
    if not package.is_dir():
        raise UserError(f"package not found: {package}")
    if not is_package(package):
        raise UserError(f"{package}: not a llama-export package (no manifest.json from this tool)")
    manifest = json.loads((package / MANIFEST).read_text())
    source = str(reference) if reference is not None else manifest["source"]["path"]
    if reference is None and not Path(source).exists():
        raise UserError(f"the package's source model is gone ({source}); pass a reference (--reference SRC)")
    precision = manifest["precision"]
    if precision not in TOLERANCES:
        raise UserError(f"no tolerance defined for precision '{precision}'")
    checkpoint = open_checkpoint(source, recorded_adapters(manifest, package))  # LoRA merged into the reference too
    check_same_shape(PackageLayout(package), checkpoint)  # before anything is printed or run
    if log:
        log(f"Verifying {package} ({manifest['target']}, {precision}) against {source}")
    return verify_package(package, checkpoint, precision, new_tokens=tokens, log=log, gates=Gates(min_top1, max_kl))


def recorded_adapters(manifest: dict, package: Path) -> list[tuple[str, float]]:
    """The LoRA adapters the manifest says were merged, as (folder, weight)."""
    entries = manifest.get("source", {}).get("lora", [])
    try:
        adapters = [(str(entry["path"]), float(entry["weight"])) for entry in entries]
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{package / 'manifest.json'}: source.lora is not a list of {{path, weight}}") from None
    return adapters


def check_runnable(folder: Path):
    """A package's genai_config.json and tokenizer (returned), checked before its model is loaded."""
    from llama_export.runtimes.onnx_package import PackageLayout
    from llama_export.runtimes.tokenizer import PackageTokenizer

    PackageLayout(folder)
    return PackageTokenizer(folder)


def open_for_run(folder: Path, threads: int | None):
    """A package's engine with TensorRT where it has one and TensorRT runs here; else its ONNX graph on the CPU."""
    from llama_export.runtimes import OnnxPackage
    from llama_export.runtimes.tensorrt_package import TensorRTPackage, has_engine, tensorrt_unavailable

    if has_engine(folder):
        missing = tensorrt_unavailable()
        if missing is None:
            return TensorRTPackage(folder)
        print(f"note: not running model.engine ({missing}); running model.onnx with ONNX Runtime on the CPU",
              file=sys.stderr)
    return OnnxPackage(folder, threads=threads)


def load(package: str | Path, threads: int | None = None) -> LoadedPackage:
    """A package ready to generate (ONNX Runtime on the CPU; its TensorRT engine where TensorRT runs here)."""
    return LoadedPackage(Path(package), threads)


class LoadedPackage:
    """`generate` continues text; `chat` holds a conversation in the package's chat template (`reset` ends it)."""

    def __init__(self, folder: Path, threads: int | None = None):
        self.folder = folder
        self.tokenizer = check_runnable(folder)
        self.package = open_for_run(folder, threads)
        self._chat = None

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> str:
        """The continuation of `prompt` (without it), up to max_new_tokens or an end token."""
        from llama_export.runtimes import generate

        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise UserError("the prompt encodes to no tokens")
        self.package.check_length(len(ids) + max_new_tokens)
        new = [t for t in generate(self.package, ids, max_new_tokens, _sampler(temperature, top_k, top_p, seed))
               if t not in self.package.eos_token_ids]
        return self.tokenizer.decode(new)

    def chat(self, message: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> str:
        """The reply to `message`, the conversation so far kept (in the KV cache too). A `system` message other
        than the conversation's starts a new conversation with it."""
        from llama_export.runtimes.chat import Chat

        if self._chat is None or (system is not None and system != self._chat.system):
            self._chat = Chat(self.package, self.folder, system=system, tokenizer=self.tokenizer)
        self._chat.sampler = _sampler(temperature, top_k, top_p, seed)
        self._chat.max_new_tokens = max_new_tokens
        return "".join(self._chat.say(message))

    @property
    def messages(self) -> list[dict]:
        """The conversation `chat` holds: role/content dicts."""
        return list(self._chat.messages) if self._chat else []

    def reset(self) -> None:
        self._chat = None


def _sampler(temperature: float, top_k: int, top_p: float, seed: int | None):
    from llama_export.runtimes import Sampler

    try:
        return Sampler(temperature, top_k, top_p, seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
