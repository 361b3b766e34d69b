"""The retained-accuracy gate: `compress check RUN --min-retention 0.9` for CI.

Every record of the checked stage (its students, one per backend; the stage's teachers when
it made no student) must keep `retention >= min_retention`; with a baseline run, its
accuracy must also not fall more than `max_drop` below the same stage, model and backend
there. Bad input (no run, no results, unknown stage) is a CompressError: exit code 2.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compress import results
from compress.errors import CompressError, Problem


@dataclass(frozen=True)
class Check:
    record: str
    """stage, model and backend of the record checked."""
    what: str
    """The rule, e.g. `retention >= 0.900`."""
    value: str
    """What was measured."""
    passed: bool


def default_stage(records: list[dict]) -> str | None:
    """The stage of the last student record that has an accuracy (the run's final student)."""
    students = [r for r in records if r.get("role") == "student" and r.get("accuracy") is not None]
    return students[-1]["stage"] if students else None


def pick(records: list[dict], stage: str | None, run_dir: Path) -> tuple[str, list[dict]]:
    """The stage checked and its records (students when it has any)."""
    stages = list(dict.fromkeys(r.get("stage") for r in records))
    stage = stage or default_stage(records)
    if stage is None:
        raise CompressError(Problem("RUN", str(run_dir), "no record has an accuracy to gate on: run with "
                                    "eval.accuracy=true on a labelled task"))
    chosen = [r for r in records if r.get("stage") == stage]
    if not chosen:
        raise CompressError(Problem("--stage", stage, f"no such stage in this run; its stages are {stages}"))
    students = [r for r in chosen if r.get("role") == "student"]
    return stage, students or chosen


def checks(run_dir: Path, min_retention: float, stage: str | None = None, baseline: Path | None = None,
           max_drop: float = 0.01) -> tuple[str, list[Check]]:
    """Load the run (and baseline) and evaluate every rule; bad input raises CompressError."""
    problems = []
    if not 0 < min_retention <= 2:
        problems.append(Problem("--min-retention", min_retention, "must be in (0, 2], e.g. 0.9 for 90%"))
    if max_drop < 0:
        problems.append(Problem("--max-drop", max_drop, "must be >= 0, e.g. 0.01 for one accuracy point"))
    if problems:
        raise CompressError(problems)
    records = results.load(run_dir)["records"]
    stage, chosen = pick(records, stage, Path(run_dir))
    base_records = results.load(baseline)["records"] if baseline is not None else None
    out = []
    for r in chosen:
        name = f"{r.get('stage')} {r.get('role')}:{r.get('model')} [{r.get('backend')}]"
        ret = r.get("retention")
        if ret is None:
            raise CompressError(Problem("--stage", stage, f"{name} has no retention (no accuracy measured, or no "
                                        "teacher accuracy): run with eval.accuracy=true"))
        out.append(Check(name, f"retention >= {min_retention:.3f}", f"{ret:.3f}", ret >= min_retention))
        if base_records is not None:
            out.append(_drop_check(name, r, base_records, baseline, max_drop))
    return stage, out


def _drop_check(name: str, r: dict, base_records: list[dict], baseline: Path, max_drop: float) -> Check:
    key = (r.get("stage"), r.get("role"), r.get("model"), r.get("backend"))
    match = [b for b in base_records if (b.get("stage"), b.get("role"), b.get("model"), b.get("backend")) == key]
    if not match or match[0].get("accuracy") is None or r.get("accuracy") is None:
        raise CompressError(Problem("--baseline", str(baseline), f"has no accuracy for {name}: compare runs of "
                                    "the same pipeline"))
    drop = match[0]["accuracy"] - r["accuracy"]
    return Check(name, f"accuracy drop vs baseline <= {max_drop:.3f}",
                 f"{r['accuracy']:.3f} (baseline {match[0]['accuracy']:.3f}, drop {drop:+.3f})", drop <= max_drop)


def table(run_dir: Path, stage: str, rows: list[Check]) -> Table:
    passed = all(c.passed for c in rows)
    t = Table(title=f"compress check {run_dir} (stage {stage}): {'PASS' if passed else 'FAIL'}")
    for col in ("record", "rule", "measured", "result"):
        t.add_column(col, justify="right" if col == "measured" else "left")
    for c in rows:
        t.add_row(escape(c.record), c.what, c.value, "[green]pass[/]" if c.passed else "[bold red]FAIL[/]")
    return t


def render(t: Table) -> str:
    """A rich table as plain text (for AssertionError messages)."""
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(t)
    return buf.getvalue()
