"""The hostile-input fuzz (tests/fuzz_sources.py) for as long as asked, with random seeds, in a process whose
address space is capped at 4 GiB; prints how many mutations each reader refused or loaded and the peak RSS.

    python bench/fuzz.py --work DIR [--minutes 30]

Not a test: tests/test_fuzz.py runs a fixed set of examples in CI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the mutated files")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None, help="seed of the rounds' seeds (default: random)")
    args = parser.parse_args()
    from test_fuzz import run_fuzz

    extra = ["--seed", str(args.seed)] if args.seed is not None else []
    report = run_fuzz(args.work, "--examples", "200", "--minutes", str(args.minutes), *extra,
                      timeout=int(args.minutes * 60) + 900)
    print(report)


if __name__ == "__main__":
    main()
