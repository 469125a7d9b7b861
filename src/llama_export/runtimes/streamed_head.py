"""A package's fp16 output projection (lm_head) computed outside ONNX Runtime, read from the weight file in row
blocks at every step.

ONNX Runtime's CPU kernels have no fp16 MatMul: to run a TensorRT package's graph on the CPU (verify, the engine's
reference outputs, `run`) it casts the fp16 lm_head to float32 once and keeps that copy (2 GB for a 128k vocabulary at
width 4096) beside the INT4 decoder layers. Here the session stops at the projection's input and
the projection runs in float32 over row blocks of the fp16 weight, which is read with plain file reads (its pages stay
out of this process). The product is accumulated in float32 as ONNX Runtime does, and the hidden state and the
product are fp16 as the graph says; ONNX Runtime's whole-graph CPU run drops those two roundings (it removes the
float32-fp16-float32 casts it inserted), so the two runs differ by about one fp16 step of the logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

STREAMED_BYTES = 256 << 20  # an fp16 projection weight at least this large is streamed
BLOCK_BYTES = 8 << 20  # fp16 weight rows read at a time (kept small: they are converted in cache)


class StreamedHead:
    """Where the projection sits in the graph and where its weight lies in the external data file."""

    def __init__(self, hidden_name: str, cast_to_float32: bool, data_path: Path, offset: int, rows: int,
                 columns: int):
        self.hidden_name, self.cast_to_float32 = hidden_name, cast_to_float32
        self.data_path, self.offset, self.rows, self.columns = data_path, offset, rows, columns
        self.threads: int | None = None
        self._session = None

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        lead = hidden.shape[:-1]
        inputs = hidden.reshape(-1, self.rows).astype(np.float32)
        product = np.zeros((inputs.shape[0], self.columns), np.float32)
        block = max(1, BLOCK_BYTES // (2 * self.columns))
        buffer = np.empty(block * self.columns, np.float16)
        try:
            with open(self.data_path, "rb") as data:
                data.seek(self.offset)
                for start in range(0, self.rows, block):
                    count = min(block, self.rows - start)
                    weight = buffer[:count * self.columns]
                    if data.readinto(weight) != weight.nbytes:
                        raise OSError("the file ends before the lm_head's last row")
                    product += self._block_product(inputs[:, start:start + count],
                                                   weight.reshape(count, self.columns))
        except OSError as exc:
            from llama_export.runtimes.onnx_package import PackageError

            raise PackageError(f"{self.data_path}: cannot read the lm_head ({exc}); was the package changed while "
                               "it ran?") from None
        logits = product.astype(np.float16).reshape(*lead, self.columns)
        return logits.astype(np.float32) if self.cast_to_float32 else logits

    def _block_product(self, inputs: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """inputs @ float32(weight) on ONNX Runtime, whose fp16 conversion is vectorized (numpy's is not)."""
        if self._session is None:
            self._session = _cast_matmul_session(self.threads)
        return self._session.run(None, {"inputs": inputs, "weight": weight})[0]


def _cast_matmul_session(threads: int | None):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["weight"], ["weight32"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["inputs", "weight32"], ["product"])], "block_product",
        [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["tokens", "rows"]),
         helper.make_tensor_value_info("weight", TensorProto.FLOAT16, ["rows", "columns"])],
        [helper.make_tensor_value_info("product", TensorProto.FLOAT, ["tokens", "columns"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=onnx.IR_VERSION_2024_3_25)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def split_head(model, folder: Path, threshold: int | None = None):
    """For a graph whose `logits` output is MatMul(hidden, W) (or a Cast of it to float32) with W a 2-D fp16
    initializer of at least `threshold` bytes in the external data file: the graph is changed in place to output
    the hidden state instead, W dropped, and the StreamedHead returned. Otherwise None and nothing changed."""
    import onnx

    graph = model.graph
    found = _projection(graph)
    if found is None:
        return None
    matmul, last, weight = found
    cast_to_float32 = last.op_type == "Cast"
    location = {entry.key: entry.value for entry in weight.external_data}
    rows, columns = weight.dims
    size = 2 * rows * columns
    if rows <= 0 or columns <= 0 or location.get("location") is None or size < (threshold or STREAMED_BYTES):
        return None
    data_path = _weight_file(folder, location, size)
    if data_path is None:
        return None  # ONNX Runtime refuses it with the whole graph, in its own words
    head = StreamedHead(matmul.input[0], cast_to_float32, data_path, int(location.get("offset", 0)), rows, columns)
    removed = {matmul.output[0], "logits"}
    kept_nodes = [node for node in graph.node if not removed & set(node.output)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_initializers = [i for i in graph.initializer if i.name != weight.name]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    outputs = [onnx.helper.make_tensor_value_info(head.hidden_name, onnx.TensorProto.FLOAT16, None)]
    outputs += [output for output in graph.output if output.name != "logits"]
    del graph.output[:]
    graph.output.extend(outputs)
    return head


@dataclass(frozen=True)
class OutputArg:
    """The `logits` output as the whole graph declares it (name, type and shape, as ONNX Runtime's NodeArg)."""
    name: str
    type: str
    shape: list


def _projection(graph):
    """(MatMul, the node making `logits`, the fp16 2-D weight) where the graph's `logits` output is MatMul(hidden, W)
    or a float32 Cast of it, and cutting there leaves the rest of the graph whole; else None."""
    import onnx

    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {output.name for output in graph.output}
    last = producers.get("logits")
    if "logits" not in outputs or last is None or consumers.get("logits"):
        return None
    if last.op_type == "Cast":
        to = next((a.i for a in last.attribute if a.name == "to"), None)
        if to != onnx.TensorProto.FLOAT or len(last.input) != 1 or consumers.get(last.input[0]) != 1:
            return None
        matmul = producers.get(last.input[0])
    else:
        matmul = last
    if matmul is None or matmul.op_type != "MatMul" or len(matmul.input) != 2 or matmul.output[0] in outputs - {
            "logits"}:
        return None
    hidden, weight_name = matmul.input
    if hidden in outputs or weight_name in {i.name for i in graph.input} or consumers.get(weight_name) != 1:
        return None  # a tied table (the embedding reads it too), or a weight fed as an input
    weight = next((i for i in graph.initializer if i.name == weight_name), None)
    if weight is None or weight.data_type != onnx.TensorProto.FLOAT16 or len(weight.dims) != 2:
        return None
    return matmul, last, weight


def _weight_file(folder: Path, location: dict[str, str], size: int) -> Path | None:
    """The external data file, where it lies inside the package folder and holds the weight's bytes where the graph
    says (as ONNX Runtime checks for the weights it reads itself)."""
    try:
        path = (folder / location["location"]).resolve()
        offset = int(location.get("offset", 0))
        length = int(location.get("length", size))
        inside = path.is_relative_to(folder.resolve()) and path.is_file()
        return path if inside and length == size and 0 <= offset and offset + size <= path.stat().st_size else None
    except (OSError, ValueError):
        return None


class StreamedHeadSession:
    """An ONNX Runtime session on the graph without its projection, answering `run` for `logits` as the whole graph
    would."""

    def __init__(self, session, head: StreamedHead):
        self.session, self.head = session, head
        hidden = next(o for o in session.get_outputs() if o.name == head.hidden_name)
        self.logits_arg = OutputArg("logits", "tensor(float)" if head.cast_to_float32 else "tensor(float16)",
                                    [*hidden.shape[:-1], head.columns])

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return [self.logits_arg] + [o for o in self.session.get_outputs() if o.name != self.head.hidden_name]

    def run(self, output_names, feed):
        output_names = output_names or [o.name for o in self.get_outputs()]
        asked = [self.head.hidden_name if name == "logits" else name for name in output_names]
        results = self.session.run(asked, feed)
        return [self.head(value) if name == "logits" else value for name, value in zip(output_names, results)]
