"""Run the benchmarks and print their figures against baselines measured in the same run.

Progress goes to stderr, the summary table (or with --json, one JSON object) to stdout. A
figure that misses its target is reported, not failed: the exit status is non-zero only when
a benchmark could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from ibutsu_benchmarks import (
    hostile_bench,
    import_bench,
    load_bench,
    overhead_bench,
    prune_bench,
    summary_bench,
    transport_bench,
)
from ibutsu_benchmarks.common import Figure, Sizes, say, use_machine_services

BENCHMARKS: dict[str, Callable[[Sizes, Path], list[Figure]]] = {
    import_bench.NAME: import_bench.run,
    prune_bench.NAME: prune_bench.run,
    summary_bench.NAME: summary_bench.run,
    hostile_bench.NAME: hostile_bench.run,
    load_bench.NAME: load_bench.run,
    overhead_bench.NAME: overhead_bench.run,
    transport_bench.NAME: transport_bench.run,
}
HEADERS = ("benchmark", "metric", "measured", "baseline", "ratio", "target", "verdict")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the benchmark runner."""
    parser = argparse.ArgumentParser(
        prog="benchmarks", description=__doc__.split("\n\n", maxsplit=1)[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run with every count divided by 10"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        default=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})",
    )
    return parser


def print_table(figures: Sequence[Figure], errors: dict[str, str], out: TextIO) -> None:
    """The figures as an aligned text table, then any benchmark that could not run."""
    rows = [list(HEADERS), *(figure.cells() for figure in figures)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADERS))]
    for number, row in enumerate(rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip(), file=out)
        if number == 0:
            print("  ".join("-" * width for width in widths), file=out)
    for name, message in errors.items():
        print(f"ERROR {name}: {message}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; 0 unless one of them failed to run."""
    args = build_parser().parse_args(argv)
    use_machine_services()
    sizes = Sizes().quick() if args.quick else Sizes()
    say(f"sizes ({'quick' if args.quick else 'full'}): {asdict(sizes)}")
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ibutsu-benchmarks-") as scratch:
        for name in args.only:
            folder = Path(scratch) / name
            folder.mkdir()
            say(f"{name}: starting")
            try:
                figures += BENCHMARKS[name](sizes, folder)
            # Report it and run the others; the exit status says something failed.
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                errors[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            say(f"{name}: finished")
    if args.json:
        document = {
            "sizes": asdict(sizes),
            "figures": [figure.as_json() for figure in figures],
            "errors": errors,
        }
        print(json.dumps(document, indent=2))
    else:
        print_table(figures, errors, sys.stdout)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
