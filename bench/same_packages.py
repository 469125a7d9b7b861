"""Packages the same before and after a change that should not alter them (a refactoring): writes the default
model's packages for a fixed set of targets and precisions, records every file's SHA-256, and compares two such
records. Three things vary between two exports of the same graph and are left out of the digests:
- in the manifest, its creation time, each pass's seconds, and model.onnx's size (see the next point);
- torch.onnx's per-node debug metadata in model.onnx (metadata_props: the Python class path and the stack trace of
  the traced code, file paths included), which names this project's modules where they are;
- the layout of model.ort: ONNX Runtime writes the same contents at different offsets from one conversion to the
  next, so an ORT file is digested by its contents (every table of its flatbuffer schema, in order).

    python bench/same_packages.py --work DIR --record before.json      # on the old checkout
    python bench/same_packages.py --work DIR --record after.json       # on the new one, the same DIR
    python bench/same_packages.py --compare before.json after.json

The exporter measured is the one `python -m` imports from the repository root: a checkout of the old top-level
layout imports its own `exporter`; the `src` layout imports the installed `llama_export` (PYTHONPATH=SRC to pick
another copy). Use the same DIR for both runs: the Hugging Face folder's path is in the manifest. Packages are
written without verify (verify only adds its result to the manifest)."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> llama-export options besides the model and the output
PACKAGES = {
    "cpu-fp32": ["--target", "cpu"],
    "cpu-int4": ["--target", "cpu", "--precision", "int4"],
    "jetson-orin-int4": ["--target", "jetson-orin", "--precision", "int4"],
    "android-arm64": ["--target", "android-arm64"],
    "hf-cpu-int4-b128": ["--target", "cpu", "--precision", "int4", "--block-size", "128"],  # calibrated (GPTQ)
}
VOLATILE_MANIFEST_KEYS = ("created",)


def cli_module() -> str:
    """The command-line module of the checkout this script belongs to."""
    return "llama_export" if (ROOT / "src" / "llama_export").is_dir() else "exporter.cli"


def write_packages(work: Path, names: list[str]) -> dict[str, Path]:
    from bench._common import default_model_as_hf_folder

    packages = {}
    for name in names:
        out = work / name
        model = [] if not name.startswith("hf-") else ["--model", str(default_model_as_hf_folder(work / "hf"))]
        subprocess.run([sys.executable, "-m", cli_module(), *model, *PACKAGES[name], "--no-verify", "--force",
                        "-q", "-o", str(out)], check=True, cwd=ROOT)
        packages[name] = out
    return packages


def digests(package: Path) -> dict[str, str]:
    result = {}
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        if path.name == "manifest.json":
            manifest = json.loads(path.read_text())
            for key in VOLATILE_MANIFEST_KEYS:
                manifest.pop(key, None)
            for report in manifest.get("passes", []):
                report.pop("seconds", None)
            for name in manifest.get("files", {}):
                if name.endswith(".onnx"):
                    manifest["files"][name] = "its digest"
            digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        elif path.suffix == ".onnx":
            digest = onnx_digest(path)
        elif path.suffix == ".ort":
            digest = ort_digest(path)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        result[str(path.relative_to(package))] = digest
    return result


def onnx_digest(path: Path) -> str:
    import onnx

    model = onnx.load(path, load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def ort_digest(path: Path) -> str:
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    session = InferenceSession.GetRootAs(path.read_bytes(), 0)
    return hashlib.sha256(repr(flatbuffer_contents(session)).encode()).hexdigest()


def flatbuffer_contents(table):
    """A flatbuffer table's fields by name, read through the generated accessors (Name(), Name(j) with
    NameLength(), NameAsNumpy()); nested tables likewise. Numeric vectors are digested."""
    from flatbuffers.table import Table

    if table is None or isinstance(table, (int, float, bytes, str)):
        return table
    if isinstance(table, Table):
        raise ValueError("a flatbuffer union other than TypeInfo.Value: teach flatbuffer_contents its member types")
    fields = {}
    for name in sorted(dir(type(table))):
        if (not name[0].isupper() or name == "Init" or name.startswith("GetRootAs")
                or name.endswith(("IsNone", "AsNumpy", "Length", "BufferHasIdentifier"))):
            continue
        accessor = getattr(table, name)
        if not callable(accessor):
            continue
        if hasattr(table, name + "AsNumpy"):
            values = getattr(table, name + "AsNumpy")()
            fields[name] = hashlib.sha256(values.tobytes()).hexdigest() if not isinstance(values, int) else None
        elif hasattr(table, name + "Length"):
            fields[name] = [flatbuffer_contents(accessor(j)) for j in range(getattr(table, name + "Length")())]
        else:
            value = accessor()
            if name == "Value" and hasattr(table, "ValueType"):  # the TypeInfoValue union
                value = union_member(value, table.ValueType())
            fields[name] = flatbuffer_contents(value)
    return fields


def union_member(union, kind: int):
    """ORT's one union, TypeInfoValue: 1 tensor_type, 2 sequence_type, 3 map_type."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import MapType, SequenceType, TensorTypeAndShape

    classes = {1: TensorTypeAndShape.TensorTypeAndShape, 2: SequenceType.SequenceType, 3: MapType.MapType}
    if union is None or kind not in classes:
        return kind
    member = classes[kind]()
    member.Init(union.Bytes, union.Pos)
    return member


def compare(before: dict, after: dict) -> list[str]:
    differences = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, {}), after.get(name, {})
        for file in sorted(set(old) | set(new)):
            if old.get(file) != new.get(file):
                state = "only before" if file not in new else "only after" if file not in old else "differs"
                differences.append(f"{name}/{file}: {state}")
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the packages")
    parser.add_argument("--record", type=Path, metavar="FILE", help="write the packages and their digests to FILE")
    parser.add_argument("--packages", nargs="*", default=list(PACKAGES), choices=list(PACKAGES), metavar="NAME")
    parser.add_argument("--reuse", action="store_true", help="digest packages already in --work instead of "
                                                              "writing them again")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        differences = compare(before, after)
        for line in differences:
            print(line)
        files = sum(len(v) for v in before.values())
        print(f"{len(before)} packages, {files} files: " + (f"{len(differences)} differ" if differences else
                                                            "all the same (what is left out: see --help)"))
        sys.exit(1 if differences else 0)
    if not (args.work and args.record):
        parser.error("--work and --record, or --compare")
    packages = {name: args.work / name for name in args.packages} if args.reuse else \
        write_packages(args.work, args.packages)
    args.record.write_text(json.dumps({name: digests(p) for name, p in packages.items()}, indent=2) + "\n")
    print(f"digests of {len(packages)} packages written to {args.record}")


if __name__ == "__main__":
    main()
