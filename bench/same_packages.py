"""Packages byte for byte the same before and after a change that should not alter them (a refactoring): writes
the default model's packages for a fixed set of targets and precisions, records every file's SHA-256 (the
manifest's without its creation time), and compares two such records.

    python bench/same_packages.py --work DIR --record before.json      # on the old checkout
    python bench/same_packages.py --work DIR --record after.json       # on the new one
    python bench/same_packages.py --compare before.json after.json

Run from the checkout to measure: its exporter is the one imported (`python -m` from the repository root).
Packages are written without verify (verify only adds its result to the manifest)."""

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
            data = json.dumps(manifest, sort_keys=True).encode()
        else:
            data = path.read_bytes()
        result[str(path.relative_to(package))] = hashlib.sha256(data).hexdigest()
    return result


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the packages")
    parser.add_argument("--record", type=Path, metavar="FILE", help="write the packages and their digests to FILE")
    parser.add_argument("--packages", nargs="*", default=list(PACKAGES), choices=list(PACKAGES), metavar="NAME")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        differences = compare(before, after)
        for line in differences:
            print(line)
        files = sum(len(v) for v in before.values())
        print(f"{len(before)} packages, {files} files: " + (f"{len(differences)} differ" if differences else
                                                            "all byte-identical"))
        sys.exit(1 if differences else 0)
    if not (args.work and args.record):
        parser.error("--work and --record, or --compare")
    packages = write_packages(args.work, args.packages)
    args.record.write_text(json.dumps({name: digests(p) for name, p in packages.items()}, indent=2) + "\n")
    print(f"digests of {len(packages)} packages written to {args.record}")


if __name__ == "__main__":
    main()
