"""A package folder opened for inference with ONNX Runtime (no onnxruntime-genai needed)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from llama_export import names
from llama_export.errors import LlamaExportError
from llama_export.runtimes.mapped_pages import paged_out_while_loading
from llama_export.runtimes.streamed_head import StreamedHeadSession, split_head

GRAPH_ONLY_BYTES = 64 << 20  # a larger .onnx file holds weights itself: not read twice to look for the lm_head
PAGE_OUT_FROM_BYTES = 1 << 30  # smaller packages' weights fit beside their packed copies


class PackageError(LlamaExportError):
    """The folder is not a package this runtime can run; reported as one line."""


def open_session(model_path: Path, threads: int | None = None, fp32_activations: bool = False):
    """An ONNX Runtime CPU session on a package's graph, its weight file's pages handed back as they are packed
    where that is safe (see `_pages_out`); a large fp16 lm_head is computed outside the session
    (runtimes/streamed_head.py). `fp32_activations` runs every MatMulNBits at accuracy_level 0 (float32 inputs
    instead of int8), the arithmetic verify's exactness check holds the graph to."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
    options.log_severity_level = 3
    # ONNX Runtime fuses a TensorRT package's DequantizeLinear+MatMul into MatMulNBits with int8 activations by
    # default, which TensorRT does not do; level 1 keeps the activations float (the graph's own MatMulNBits, on
    # the cpu target, are unaffected)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    model = _graph(model_path)
    head = None if model is None else split_head(model, model_path.parent)
    edited = fp32_activations and _with_fp32_activations(model, model_path)
    if head is not None or edited:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(model_path.parent))
    if head is not None:
        head.threads = options.intra_op_num_threads
    loading = paged_out_while_loading(model_path.parent) if _pages_out(model) else contextlib.nullcontext()
    try:
        with loading:
            session = ort.InferenceSession(model.SerializeToString() if head is not None or edited else str(model_path),
                                           options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PackageError(f"{model_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
    return StreamedHeadSession(session, head) if head is not None else session


def _with_fp32_activations(model, model_path: Path) -> bool:
    """Set every MatMulNBits of the loaded graph to accuracy_level 0; whether any was changed."""
    if model is None:
        raise PackageError(f"{model_path}: the graph cannot be read apart from its weights to run it with float32 "
                           "activations")
    changed = False
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level" and attribute.i != 0:
                    attribute.i, changed = 0, True
    return changed


def _graph(model_path: Path):
    """The graph without its weights; None for ORT-format files, graphs holding their weights and graphs onnx
    cannot read (left to ONNX Runtime, which reports what is wrong in one line)."""
    if model_path.suffix != ".onnx" or model_path.stat().st_size > GRAPH_ONLY_BYTES:
        return None
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return None


def _pages_out(model) -> bool:
    """Whether to page the weight file out while the session loads: for graphs of at least PAGE_OUT_FROM_BYTES
    of external weights where no MatMul or Gemm reads a float32 weight itself. ONNX Runtime packs those for its
    SGEMM in column panels, reading every page of the matrix once per panel: paged out between panels, the
    matrix came back from disk again and again (a 0.5 GB fp32 package took over 5 minutes to load instead of 4 s).
    Block-quantized weights are packed row block by row block, each page read once."""
    import onnx

    if model is None:
        return False
    external = {i.name: i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    size = sum(int(entry.value) for i in external.values() for entry in i.external_data if entry.key == "length")
    if size < PAGE_OUT_FROM_BYTES:
        return False
    float_weights = {name for name, i in external.items() if i.data_type == onnx.TensorProto.FLOAT}
    return not any(node.op_type in ("MatMul", "Gemm") and float_weights & set(node.input) for node in model.graph.node)


class PackageLayout:
    """What genai_config.json says about a package: layers, heads, IO names, end tokens."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config_path = self.folder / "genai_config.json"
        if not self.folder.is_dir():
            raise PackageError(f"package not found: {self.folder}")
        if not config_path.is_file():
            raise PackageError(f"{self.folder}: not a package (no genai_config.json)")
        try:
            self.genai_config = json.loads(config_path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise PackageError(f"{config_path}: unreadable ({exc})") from None
        try:
            self._read_layout(self.genai_config)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PackageError(f"{config_path}: not the genai_config.json of a decoder package (field {exc} missing "
                               "or of the wrong type); re-export the package") from None

    def _read_layout(self, genai_config: dict) -> None:
        model = genai_config["model"]
        decoder = model["decoder"]
        self.decoder_config = decoder
        self.num_layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.vocab_size = int(model["vocab_size"])
        self.context_length = int(model.get("context_length") or 0) or None  # None: not stated
        eos = model.get("eos_token_id")
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        names = decoder["inputs"]
        self.past_names = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.num_layers)]
        outputs = decoder["outputs"]
        self.present_names = [
            (outputs["present_key_names"] % i, outputs["present_value_names"] % i) for i in range(self.num_layers)
        ]

    def check_length(self, tokens: int) -> None:
        """Refuse a sequence longer than the package's context (its rotary tables end there)."""
        if self.context_length is not None and tokens > self.context_length:
            raise PackageError(f"{self.folder}: {tokens} tokens is past the package's context of "
                               f"{self.context_length}; shorten the prompt or generate fewer tokens")


class OnnxPackage(PackageLayout):
    def __init__(self, folder: str | Path, threads: int | None = None, model_file: str | None = None,
                 fp32_activations: bool = False):
        super().__init__(folder)
        decoder = self.decoder_config
        model_path = self.folder / (model_file or decoder["filename"])
        if not model_path.is_file():
            raise PackageError(f"{self.folder}: model file {model_path.name} is missing")
        self.session = open_session(model_path, threads, fp32_activations)
        self.input_names = {i.name for i in self.session.get_inputs()}
        past_type = next(i.type for i in self.session.get_inputs() if i.name == self.past_names[0][0])
        self.kv_dtype = np.float16 if "float16" in past_type else np.float32

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_size)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.num_layers)]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {names.INPUT_IDS: input_ids, names.ATTENTION_MASK: attention_mask}
        if names.POSITION_IDS in self.input_names:
            feed[names.POSITION_IDS] = position_ids
        for (key_name, value_name), i in zip(self.past_names, range(0, len(past), 2)):
            feed[key_name], feed[value_name] = past[i], past[i + 1]
        output_names = [names.LOGITS] + [name for pair in self.present_names for name in pair]
        logits, *present = self.session.run(output_names, feed)
        return logits, present
