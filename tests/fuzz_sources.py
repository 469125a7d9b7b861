"""Fuzzing the source readers and config checks with hypothesis: mutated GGUF files, safetensors headers and
config.json files must either load correctly (every tensor readable at the shape its header gives) or be refused
with a UserError; any other exception, or an example over its time limit, fails the run.

    python tests/fuzz_sources.py --work DIR [--examples N] [--minutes M] [--seed S]

tests/test_fuzz.py runs a bounded number of examples under a memory cap; bench/fuzz.py runs it for longer."""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EXAMPLE_SECONDS = 30  # one example's open-and-load, far below the 60 s a header case may take


class Failure(AssertionError):
    pass


def load_everything(path: Path) -> str:
    """Open a source and read every tensor; 'refused: ...' for a UserError, 'loaded' when all of it reads."""
    from llama_export.exporter.errors import UserError
    from llama_export.exporter.sources import open_checkpoint

    started = time.monotonic()
    try:
        checkpoint = open_checkpoint(path)
        for name, info in checkpoint.weights.items():
            values = info.load()
            if tuple(values.shape) != tuple(info.shape):
                raise Failure(f"{name} loaded as {values.shape}, its header says {info.shape}")
            if info.load_quantized is not None:
                info.load_quantized()
        outcome = "loaded"
    except UserError as exc:
        message = str(exc)
        if "\n" in message or not message:
            raise Failure(f"a refusal must be one line: {message!r}") from None
        outcome = "refused"
    elapsed = time.monotonic() - started
    if elapsed > EXAMPLE_SECONDS:
        raise Failure(f"took {elapsed:.0f} s")
    return outcome


# --- GGUF: bytes of a small valid file, mutated in the header (where counts and offsets live) -------------------

def gguf_mutations(header_end: int):
    from hypothesis import strategies as st

    position = st.integers(0, header_end + 64)
    u64 = st.sampled_from([0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 62, 2 ** 63, 2 ** 64 - 1]) | st.integers(0, 2 ** 64 - 1)
    byte_edit = st.tuples(st.just("byte"), position, st.integers(0, 255))
    word_edit = st.tuples(st.just("u64"), position, u64)
    u32_edit = st.tuples(st.just("u32"), position, st.integers(0, 2 ** 32 - 1))
    cut = st.tuples(st.just("cut"), st.integers(0, header_end + 4096), st.just(0))
    return st.lists(byte_edit | word_edit | u32_edit | cut, min_size=1, max_size=4)


def apply_edits(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, at, value in edits:
        if kind == "cut":
            del out[at:]
            continue
        fmt = {"byte": "<B", "u64": "<Q", "u32": "<I"}[kind]
        packed = struct.pack(fmt, value)
        if at + len(packed) <= len(out):
            out[at:at + len(packed)] = packed
    return bytes(out)


# --- safetensors: the JSON header rewritten entry by entry ------------------------------------------------------

def header_values():
    from hypothesis import strategies as st

    size = st.integers(-3, 2 ** 64) | st.sampled_from([0, 1, 64, 320, 2 ** 40])
    return st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "F8_E4M3", "", "Q4"])),
        st.tuples(st.just("shape"), st.lists(size, max_size=5) | st.just("x") | st.none()),
        st.tuples(st.just("data_offsets"), st.lists(size, min_size=0, max_size=3) | st.none()),
        st.tuples(st.just("delete"), st.none()),
    )


def safetensors_with(original: bytes, edits, header_length_edit) -> bytes:
    length = int.from_bytes(original[:8], "little")
    header = json.loads(original[8:8 + length])
    names = [n for n in header if n != "__metadata__"]
    for index, (field, value) in edits:
        name = names[index % len(names)]
        if field == "delete":
            header.pop(name, None)
        elif isinstance(header.get(name), dict):
            header[name][field] = value
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    declared = len(encoded) if header_length_edit is None else header_length_edit
    return declared.to_bytes(8, "little", signed=False) + encoded + original[8 + length:]


# --- config.json: fields replaced by hostile values -------------------------------------------------------------

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                 "rope_theta", "tie_word_embeddings", "rope_scaling", "model_type", "attention_bias")


def config_values():
    from hypothesis import strategies as st

    scalar = (st.integers(-2, 2 ** 40) | st.sampled_from([0, 1, 2, 64, 100000, 10 ** 12]) | st.floats()
              | st.booleans() | st.none() | st.text(max_size=8))
    rope = st.fixed_dictionaries({"rope_type": st.sampled_from(["default", "linear", "llama3", "yarn", "warp", ""]),
                                  "factor": st.floats(-2, 64) | st.none()})
    return st.lists(st.tuples(st.sampled_from(CONFIG_FIELDS), scalar | rope | st.lists(scalar, max_size=2)),
                    min_size=1, max_size=4)


def fuzz(work: Path, examples: int, minutes: float | None, seed: int | None) -> dict:
    from helpers import make_hf_model, write_tiny_gguf
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as with_seed
    from hypothesis import strategies as st

    work.mkdir(parents=True, exist_ok=True)
    gguf_path = work / "base.gguf"
    write_tiny_gguf(gguf_path, arrays={"tokenizer.ggml.tokens": [f"t{i}" for i in range(40)],
                                       "tokenizer.ggml.token_type": [1] * 40})
    gguf_bytes = gguf_path.read_bytes()
    from llama_export.exporter.sources.gguf_file import _open_reader

    header_end = _open_reader(gguf_path).data_offset
    folder = make_hf_model(work / "base-hf", "llama2-gqa")
    weights = (folder / "model.safetensors").read_bytes()
    config = json.loads((folder / "config.json").read_text())
    counts = {"gguf": {}, "safetensors": {}, "config": {}}

    def tally(kind: str, outcome: str) -> None:
        counts[kind][outcome] = counts[kind].get(outcome, 0) + 1

    def cases(round_seed: int | None):
        budget = settings(max_examples=examples, deadline=None, database=None, derandomize=round_seed is None,
                          suppress_health_check=list(HealthCheck))

        def seeded(test):
            return budget(with_seed(round_seed)(test) if round_seed is not None else test)

        @seeded
        @given(gguf_mutations(header_end))
        def gguf_case(edits):
            path = work / "case.gguf"
            path.write_bytes(apply_edits(gguf_bytes, edits))
            tally("gguf", load_everything(path))

        @seeded
        @given(st.lists(st.tuples(st.integers(0, 100), header_values()), min_size=1, max_size=3),
               st.none() | st.integers(0, 2 ** 64 - 1) | st.sampled_from([0, 7, 8, 2 ** 63]))
        def safetensors_case(edits, header_length):
            case = work / "case-hf"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(folder, case)
            (case / "model.safetensors").write_bytes(safetensors_with(weights, edits, header_length))
            tally("safetensors", load_everything(case))

        @seeded
        @given(config_values())
        def config_case(changes):
            from llama_export.exporter.errors import one_line
            from llama_export.targets import TargetError
            from llama_export.targets.plan import ModelShape

            case = work / "case-config"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(folder, case)
            changed = dict(config)
            changed.update(dict(changes))
            (case / "config.json").write_text(json.dumps(changed))
            tally("config", load_everything(case))
            try:
                ModelShape.from_json(case / "config.json")
            except TargetError as exc:
                if "\n" in one_line(exc):  # as the CLI prints it
                    raise Failure(f"a plan refusal must be one line: {exc!r}") from None

        return gguf_case, safetensors_case, config_case

    if minutes is None:  # one derandomized (or seeded) round: the same examples on every run
        for case in cases(seed):
            case()
        return counts
    import random

    rounds, deadline = 0, time.monotonic() + minutes * 60
    generator = random.Random(seed)
    while time.monotonic() < deadline:
        for case in cases(generator.randrange(2 ** 32)):
            case()
        rounds += 1
    counts["rounds"] = rounds
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=150, help="examples per reader (default 150)")
    parser.add_argument("--minutes", type=float, help="run until this many minutes have passed (all three readers)")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    started = time.monotonic()
    counts = fuzz(args.work, args.examples, args.minutes, args.seed)
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"counts": counts, "seconds": round(time.monotonic() - started, 1),
                      "peak_rss_mb": round(peak_mb)}))


if __name__ == "__main__":
    main()
