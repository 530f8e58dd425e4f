"""Render ``bench/results/latest.json`` as markdown for the README's Benchmarks section.

python -m bench.readme_table                 # print the markdown
python -m bench.readme_table --write README.md   # replace the block between the bench markers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import report

START = "<!-- bench-table:start (python -m bench.readme_table --write README.md) -->"
END = "<!-- bench-table:end -->"


def render(result: dict[str, Any], source: str = "bench/results/latest.json") -> str:
    """Markdown: machine line, the table, and the summary lines of the run."""
    when = result.get("created_utc", "?")
    mode = " (quick smoke run)" if result.get("quick") else ""
    lines = [
        f"Run `{when}`{mode}, from `{source}`, on {report.describe_machine(result['machine'])}.",
        "",
        report.markdown_table(result["table"]),
        "",
    ]
    lines += [f"- {line}" for line in result.get("summary", [])[1:]]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """Put ``block`` between the START and END markers of ``text`` (markers must exist, once each)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START!r} followed by one {END!r}")
    head, rest = text.split(START, 1)
    _old, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(report.RESULTS_DIR / "latest.json"))
    p.add_argument("--write", metavar="README", help="replace the marked block in this file")
    args = p.parse_args(argv)
    path = Path(args.results)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"{path} does not exist: run `make bench` first", file=sys.stderr)
        return 2
    try:
        source = str(path.resolve().relative_to(report.ROOT))
    except ValueError:
        source = str(path)
    block = render(result, source)
    if not args.write:
        print(block)
        return 0
    readme = Path(args.write)
    try:
        readme.write_text(replace_block(readme.read_text(encoding="utf-8"), block), encoding="utf-8")
    except ValueError as exc:
        print(f"{readme}: {exc}", file=sys.stderr)
        return 2
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
