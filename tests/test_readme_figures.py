"""Every figure in the README's benchmark tables comes from the JSON its benchmark wrote.

A table belongs to the last `benchmarks/<name>.py` command named before it; each number in its rows
(thousands separators, decimals and percentages as printed) must equal, at the printed precision,
some number in `benchmarks/results/<name>.json`, read as is or in the units a table prints (percent,
ms, MB, GB). A figure typed by hand, kept from an older run or rounded up to its goal fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
COMMAND = re.compile(r"benchmarks/(\w+)\.py")
NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])\d+(?:\.\d+)?")
# How a JSON value may be printed: as is, as a percentage, in milli-units, or in mega/giga(bytes).
SCALES = (1.0, 100.0, 1e3, 1e-6, 1e-9, 2.0**-20, 2.0**-30)


def benchmark_tables(readme: str) -> Iterator[tuple[str, list[str]]]:
    """(benchmark name, data rows) for each table after a `benchmarks/<name>.py` mention."""
    name, rows, header = None, [], False
    for line in readme.splitlines():
        if line.startswith("|"):
            if not header:
                header = True  # a table's first line names its columns
            elif name and not set(line) <= set("|- "):
                rows.append(line)
            continue
        header = False
        if rows:
            yield name, rows
            rows = []
        found = COMMAND.findall(line)
        if found:
            name = found[-1]
        elif line.startswith("#"):
            name = None  # a new section: tables under it belong to no benchmark until one is named
    if rows:
        yield name, rows


def json_numbers(value: object) -> Iterator[float]:
    """Every measured number of a result: goals are left out, so a figure cannot be backed by its own goal."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in ("goal", "goals"):
                yield from json_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from json_numbers(item)


def backed(printed: str, numbers: list[float]) -> bool:
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    shown = float(printed.replace(",", ""))
    return any(round(number * scale, decimals) == shown for number in numbers for scale in SCALES)


def figures_of(row: str) -> list[str]:
    """The numbers of a table row, less its first cell (a label such as a model name or a ZeRO stage) and
    its goal cells (`>= 2`, `<= 5 ms: not met`: the benchmark's constants, not measurements)."""
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    return [match for cell in cells[1:] if not cell.startswith((">=", "<=")) for match in NUMBER.findall(cell)]


TABLES = list(benchmark_tables((REPO / "README.md").read_text(encoding="utf-8")))


def test_the_readme_has_benchmark_tables_and_each_has_its_result_file():
    names = {name for name, _ in TABLES if name}
    assert {"backfill_pipeline", "engine_decode", "engine_batching", "serve_latency", "train_zero"} <= names
    for name in names:
        assert (RESULTS / f"{name}.json").is_file(), f"README quotes benchmarks/{name}.py but no result file holds it"


@pytest.mark.parametrize(("name", "rows"), [t for t in TABLES if t[0]], ids=[t[0] for t in TABLES if t[0]])
def test_every_figure_of_a_benchmark_table_is_in_its_json(name, rows):
    numbers = list(json_numbers(json.loads((RESULTS / f"{name}.json").read_text())))
    missing = [(row, figure) for row in rows for figure in figures_of(row) if not backed(figure, numbers)]
    assert not missing, f"benchmarks/results/{name}.json holds none of these README figures: {missing}"


def test_a_figure_is_backed_only_at_its_printed_precision_and_units():
    """The check itself: 0.846 is printed 0.85 or 0.846, never 0.85 "at the goal" from 0.8449; a rate
    in bytes/s is backed in GB/s, a fraction as a percentage; a table belongs to the benchmark named above it."""
    assert backed("0.85", [0.846]) and backed("0.846", [0.846]) and not backed("0.85", [0.8449])
    assert backed("1,621", [1620.708]) and not backed("1,620", [1620.708])
    assert backed("30.1", [30_125_314_519.0]) and backed("42.5", [0.4251]) and backed("8.3", [0.00831])
    row = "| small (9.54M) | batch 32 / batch 1 | 1,621 tok/s | 10.40 | >= 8 |"
    assert figures_of(row) == ["32", "1", "1,621", "10.40"]
    assert list(json_numbers({"ratio": 0.846, "goal": 0.85, "goals": {"b": 8}})) == [0.846]
    tables = list(benchmark_tables("`benchmarks/x.py` run:\n\n| a | b |\n| --- | --- |\n| 1 | 2.5 |\n\n## Next\n"
                                   "| c |\n| --- |\n| 3 |\n"))
    assert tables == [("x", ["| 1 | 2.5 |"])]  # the table under "## Next" names no benchmark: not checked
