"""llama-export: compile LLaMA-family checkpoints into verified ONNX Runtime and TensorRT edge packages.

exporter: sources, tracing, calibration, verification, the pipeline and the CLI; passes: graph-to-graph
transformations; targets: one recipe per target and the package writers; runtimes: running packages, and the C and
C# programs that embed them."""
