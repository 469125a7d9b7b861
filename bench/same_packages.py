"""Packages the same before and after a change that should not alter them (a refactoring): writes the default
model's packages for a fixed set of targets and precisions, records every file's SHA-256, and compares two such
records. Three things vary between two exports of the same graph and are left out of the digests:
- in the manifest, its creation time, each pass's seconds, and the model file's size (model.onnx or model.ort,
  with the ORT file's "graph and format" share): the file's own digest checks what it holds;
- torch.onnx's debug metadata in model.onnx (each node's metadata_props: the Python class path and the stack trace
  of the traced code, file paths included; the graph's `pkg.torch.*` entries), which packages written before the
  exporter dropped it hold;
- the layout of model.ort: ONNX Runtime writes the same contents at different offsets from one conversion to the
  next, so an ORT file is digested by its contents (every table of its flatbuffer schema, in order).

Each model file is also digested as a graph: every node named by its place in the graph, every value that is not
a graph input or output after the node that produces it (or, for an initializer, the first node that reads it),
values and initializers sorted by those names, and the recorded types of Constant nodes' outputs left out. Two files
with the same graph digest hold the same nodes in the same order, with the same attributes, weights and IO, and
differ only in what nodes and intermediate values are called (a rewrite that builds a node anew instead of keeping
it names it anew).

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
                if name.endswith((".onnx", ".ort")):
                    manifest["files"][name] = "its digest"
            ort = manifest.get("ort_format", {})
            if "model_bytes" in ort:
                ort["model_bytes"] = "its digest"
                ort.get("size_breakdown", {}).pop("graph and format", None)
            digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        elif path.suffix == ".onnx":
            digest = onnx_digest(path)
            result[str(path.relative_to(package)) + GRAPH] = onnx_digest(path, canonical=True)
        elif path.suffix == ".ort":
            digest = ort_digest(path)
            result[str(path.relative_to(package)) + GRAPH] = ort_digest(path, canonical=True)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        result[str(path.relative_to(package))] = digest
    return result


GRAPH = " (graph)"  # the key of a model file's graph digest in a record


def canonical_names(nodes, kept) -> dict:
    """old name -> a name from the graph's structure: 'node<i>' for the i-th node, '<its node>:out<j>' for a
    node's output, else '<node>:in<j>' of the first node reading it. `nodes` yields (name, inputs, outputs) in graph
    order; value names in `kept` stay."""
    names = {}
    for i, (node, _, outputs) in enumerate(nodes):
        names[node] = f"node{i}"
        names.update({value: f"node{i}:out{j}" for j, value in enumerate(outputs) if value and value not in kept})
    for i, (_, inputs, _) in enumerate(nodes):
        for j, value in enumerate(inputs):
            if value and value not in kept and value not in names:
                names[value] = f"node{i}:in{j}"
    return names


def onnx_digest(path: Path, canonical: bool = False) -> str:
    import onnx

    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
    own_entries = [entry for entry in graph.metadata_props if not entry.key.startswith("pkg.torch.")]
    del graph.metadata_props[:]
    graph.metadata_props.extend(own_entries)
    if canonical:
        kept = {v.name for v in graph.input} | {v.name for v in graph.output}
        names = canonical_names([(n.name, list(n.input), list(n.output)) for n in graph.node], kept)
        constants = {n.output[0] for n in graph.node if n.op_type == "Constant"}
        for node in graph.node:
            node.name = names[node.name]
            node.input[:] = [names.get(v, v) for v in node.input]
            node.output[:] = [names.get(v, v) for v in node.output]
        infos = [v for v in graph.value_info if v.name not in constants]
        for item in [*infos, *graph.initializer]:
            item.name = names.get(item.name, item.name)
        for field, items in (("value_info", infos), ("initializer", list(graph.initializer))):
            ordered = [proto_copy(item) for item in sorted(items, key=lambda item: item.name)]
            graph.ClearField(field)
            getattr(graph, field).extend(ordered)
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def proto_copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def ort_digest(path: Path, canonical: bool = False) -> str:
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    contents = flatbuffer_contents(InferenceSession.GetRootAs(path.read_bytes(), 0))
    if canonical:
        graph = contents["Model"]["Graph"]
        nodes = [(n["Name"], n["Inputs"], n["Outputs"]) for n in graph["Nodes"]]
        names = canonical_names(nodes, set(graph["Inputs"]) | set(graph["Outputs"]))
        graph = renamed(graph, {old: new.encode() for old, new in names.items()})
        for field in ("NodeArgs", "Initializers"):
            graph[field] = sorted(graph[field], key=lambda item: item["Name"])
        contents["Model"]["Graph"] = graph
    return hashlib.sha256(repr(contents).encode()).hexdigest()


def renamed(contents, names: dict):
    """Every string in a flatbuffer's contents that `names` maps, replaced."""
    if isinstance(contents, dict):
        return {key: renamed(value, names) for key, value in contents.items()}
    if isinstance(contents, list):
        return [renamed(value, names) for value in contents]
    return names.get(contents, contents) if isinstance(contents, bytes) else contents


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


def compare(before: dict, after: dict) -> tuple[list[str], list[str]]:
    """(files that differ, model files that differ only in their intermediate values' names)."""
    differences, renamed_only = [], []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, {}), after.get(name, {})
        for file in sorted(f for f in set(old) | set(new) if not f.endswith(GRAPH)):
            if old.get(file) == new.get(file):
                continue
            if file in old and file in new and old.get(file + GRAPH) and old.get(file + GRAPH) == new.get(file + GRAPH):
                renamed_only.append(f"{name}/{file}: the same graph, nodes and intermediate values named differently")
            else:
                state = "only before" if file not in new else "only after" if file not in old else "differs"
                differences.append(f"{name}/{file}: {state}")
    return differences, renamed_only


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
        differences, renamed_only = compare(before, after)
        for line in renamed_only + differences:
            print(line)
        files = sum(1 for v in before.values() for f in v if not f.endswith(GRAPH))
        same = files - len(differences) - len(renamed_only)
        print(f"{len(before)} packages, {files} files: {same} the same, {len(renamed_only)} the same graph with "
              f"names changed, {len(differences)} differ (what is left out: see --help)")
        sys.exit(1 if differences else 0)
    if not (args.work and args.record):
        parser.error("--work and --record, or --compare")
    packages = {name: args.work / name for name in args.packages} if args.reuse else \
        write_packages(args.work, args.packages)
    args.record.write_text(json.dumps({name: digests(p) for name, p in packages.items()}, indent=2) + "\n")
    print(f"digests of {len(packages)} packages written to {args.record}")


if __name__ == "__main__":
    main()
