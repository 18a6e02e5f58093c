"""`python -m bench`: benchmark Moorage against the CNCF distribution registry."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench.report import render_markdown, update_docs, write_chart
from bench.runner import run
from bench.scenarios import SCENARIOS, Sizes


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and one round (smoke test)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 3)")
    parser.add_argument(
        "--only",
        action="append",
        choices=[s.key for s in SCENARIOS],
        help="run only this scenario (repeatable)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="results directory"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help="also rewrite the results section of this page (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--moorage-workers",
        type=int,
        default=2,
        help="Moorage server processes (MOORAGE_WORKERS); default 2, one per core",
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        help="render an earlier run's results.json again instead of running",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the registries' temporary data"
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help=(
            "after the scenarios, load 10,000 repositories with 10 tags each and "
            "run manifest GET, blob HEAD, small images, tag list and catalog again "
            "(--quick always does, with 40 repositories of 3 tags)"
        ),
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    sizes = Sizes.quick() if arguments.quick else Sizes.full()
    rounds = arguments.rounds or (1 if arguments.quick else 3)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    if arguments.from_results is not None:
        results = json.loads(arguments.from_results.read_text())
    else:
        results = run(
            sizes,
            rounds,
            arguments.only,
            command.strip(),
            arguments.moorage_workers,
            keep=arguments.keep,
            scale=arguments.scale or arguments.quick,
        )

    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "results.json").write_text(json.dumps(results, indent=2))
    chart = write_chart(results, arguments.out / "ratios.png")
    markdown = render_markdown(results, chart.name if chart else None)
    (arguments.out / "results.md").write_text(markdown)
    print(markdown)
    if arguments.docs is not None:
        update_docs(arguments.docs, results, chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
