"""Rows of the bench table: one figure per server (ours, Orthanc), the ratio, the goal, and how they print.

A row may be ours alone (`ours_only`: Orthanc has no equivalent, its column says n/a) with an absolute
`target` for our figure instead of a ratio goal."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from bench.measure import Failed
from bench.servers import Server


@dataclass
class Cell:
    """One server's figure for a row: a value, or the reason there is none; detail goes to the JSON."""

    value: float | None = None
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    name: str
    unit: str  # "/s", "ms", "s", "MB/s", "MB"
    better: str  # "higher" or "lower"
    goal: float | None  # ratio ours/theirs to reach (>= for higher, <= for lower)
    ours: Cell = field(default_factory=Cell)
    theirs: Cell = field(default_factory=Cell)
    target: float | None = None  # an absolute goal for our figure (>= for higher, <= for lower)
    ours_only: bool = False  # Orthanc has no equivalent

    @property
    def ratio(self) -> float | None:
        if self.ours_only or self.ours.value is None or self.theirs.value is None or not self.theirs.value:
            return None
        return self.ours.value / self.theirs.value

    @property
    def verdict(self) -> str:
        if self.target is not None:
            if self.ours.value is None:
                return "MISS"
            met = (
                self.ours.value >= self.target if self.better == "higher" else self.ours.value <= self.target
            )
            return "PASS" if met else "MISS"
        if self.goal is None:
            return "-"
        ratio = self.ratio
        if ratio is None:
            return "MISS" if self.ours.value is None and self.theirs.value is not None else "-"
        met = ratio >= self.goal if self.better == "higher" else ratio <= self.goal
        return "PASS" if met else "MISS"


def cell(server: Server, how: Callable[[], tuple[float, dict[str, Any]]]) -> Cell:
    """Run one measurement on one server; any failure becomes the cell's reason, never an exception."""
    if server.error:
        return Cell(error=server.error)
    if not server.alive():
        return Cell(error="server process is no longer running")
    cpu_before, client_before = server.cpu(), time.process_time()
    try:
        value, detail = how()
    except Failed as exc:
        return Cell(error=str(exc))
    except requests.RequestException as exc:
        return Cell(error=f"{type(exc).__name__}: {str(exc)[:200]}")
    except Exception as exc:  # noqa: BLE001 - the bench reports, it never crashes
        traceback.print_exc()
        return Cell(error=f"{type(exc).__name__}: {str(exc)[:200]}")
    detail["server_cpu_s"] = round(server.cpu() - cpu_before, 2)
    detail["client_cpu_s"] = round(time.process_time() - client_before, 2)
    if detail.get("ops"):
        detail["server_cpu_ms_per_op"] = round(detail["server_cpu_s"] * 1000 / detail["ops"], 2)
    return Cell(value, None, detail)


def solo(add: Callable[[Row, dict[str, Cell]], Row], row: Row, result: Cell) -> Row:
    """A row of ours alone (Orthanc has no equivalent)."""
    row.ours_only = True
    return add(row, {"ours": result, "theirs": Cell()})


def measured(problem: str | None, server: Server, how: Callable[[], tuple[float, dict[str, Any]]]) -> Cell:
    """cell(), unless the setup already failed: then the row says why."""
    return Cell(error=problem) if problem is not None else cell(server, how)


def pick(result: Cell, key: str) -> Cell:
    """Another figure of a measurement already made (its p50 beside its p95), as a cell of its own."""
    if result.value is None:
        return Cell(error=result.error)
    value = result.detail.get(key)
    return Cell(value, None if value is not None else f"{key} not measured")


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "failed"
    if unit in ("ms", "s"):
        return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    if unit == "MB":
        return f"{value:.1f} MB" if value < 10 else f"{value:.0f} MB"
    if unit == "MB/s":
        return f"{value:.0f} MB/s"
    return f"{value:.0f}{unit}"


def goal_text(row: Row) -> str:
    if row.target is not None:
        sign = ">=" if row.better == "higher" else "<="
        return f"{sign} {row.target:g}{'' if row.unit.startswith('/') else ' '}{row.unit}"
    if row.goal is None:
        return "-"
    return f"{'>=' if row.better == 'higher' else '<='} {row.goal:g}x"


def columns(row: Row) -> list[str]:
    ratio = row.ratio
    return [
        row.name,
        fmt(row.ours.value, row.unit),
        "n/a" if row.ours_only else fmt(row.theirs.value, row.unit),
        "-" if ratio is None else f"{ratio:.2f}x",
        goal_text(row),
        row.verdict,
    ]


WIDTHS = (52, 12, 12, 8, 9, 5)


def format_row(row: Row) -> str:
    return "  ".join(text.ljust(width) for text, width in zip(columns(row), WIDTHS, strict=True)).rstrip()


def print_table(rows: list[Row]) -> None:
    header = ["row", "ours", "theirs", "ratio", "goal", "     "]
    print()
    print("  ".join(text.ljust(width) for text, width in zip(header, WIDTHS, strict=True)).rstrip())
    print("-" * (sum(WIDTHS) + 2 * (len(WIDTHS) - 1)))
    for row in rows:
        print(format_row(row))
    failures: dict[tuple[str, str], list[str]] = {}  # (side, reason) -> rows, so one cause prints once
    for row in rows:
        for side in ("ours",) if row.ours_only else ("ours", "theirs"):
            error = getattr(row, side).error
            if error:
                failures.setdefault((side, error), []).append(row.name)
    missed = [row.name for row in rows if row.verdict == "MISS"]
    if failures:
        print("\nFailures:")
        for (side, error), names in failures.items():
            where = names[0] if len(names) == 1 else f"{len(names)} rows from {names[0]!r}"
            print(f"  {side}, {where}: {error}")
    print("\nGoals missed: " + ("; ".join(missed) if missed else "none"))
    for row in rows:
        if row.verdict == "MISS" and row.ours.value is not None:
            print(f"  {row.name}: {cpu_note(row)}")


def cpu_note(row: Row) -> str:
    """Server CPU per request on each side: tells a CPU-bound miss from one that waits on something."""
    parts = []
    for side in ("ours", "theirs"):
        detail = getattr(row, side).detail
        if "server_cpu_ms_per_op" in detail:
            parts.append(f"{side} {detail['server_cpu_ms_per_op']:g} ms server CPU/request")
    return ", ".join(parts) or "no CPU figures"
