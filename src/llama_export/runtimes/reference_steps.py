"""Reference outputs of a package's graph on ONNX Runtime (CPU): a prefill of fixed ids, then one decode step fed
the prefill's cache. The TensorRT engine built later on the device is checked against them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_export import names
from llama_export.runtimes.onnx_package import open_session
from llama_export.runtimes.streamed_head import StreamedHeadSession


def run_reference_steps(model_path: Path, io: dict, ids: list[int]) -> tuple[dict[str, np.ndarray], list[str], str]:
    """The steps' inputs and logits keyed "prefill/in/input_ids", "decode/out/logits" and so on, the names of the
    graph's inputs, and the runtime that produced them."""
    import onnxruntime as ort

    session = open_session(model_path)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    past = {}
    for name, spec in io["inputs"].items():
        if name.startswith(names.PAST_PREFIX):
            dims = [1 if d == "batch" else 0 if d == "past_sequence" else d for d in spec["shape"]]
            past[name] = np.zeros(dims, dtype=np.float16 if "float16" in inputs[name].type else np.float32)
    arrays, length = {}, 0
    step_ids = np.array([ids], dtype=np.int64)
    for step in ("prefill", "decode"):
        if step == "decode":
            step_ids = arrays["prefill/out/logits"][:, -1:].argmax(-1).astype(np.int64)
        count = step_ids.shape[1]
        feed = {names.INPUT_IDS: step_ids, names.ATTENTION_MASK: np.ones((1, length + count), np.int64), **past}
        if names.POSITION_IDS in inputs:
            feed[names.POSITION_IDS] = np.arange(length, length + count, dtype=np.int64)[None]
        results = dict(zip(outputs, session.run(outputs, feed)))
        for name, value in feed.items():
            arrays[f"{step}/in/{name}"] = value
        arrays[f"{step}/out/{names.LOGITS}"] = results[names.LOGITS].astype(np.float32)
        past = {name: results[name.replace(names.PAST_PREFIX, names.PRESENT_PREFIX)] for name in past}
        length += count
    streamed = ", the fp16 lm_head in float32 row blocks" if isinstance(session, StreamedHeadSession) else ""
    return arrays, list(feed), f"onnxruntime {ort.__version__} (CPU{streamed})"
