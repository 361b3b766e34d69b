"""The retained-accuracy gate: `compress check RUN --min-retention 0.9` for CI.

The gate follows roles: it checks the students a stage hands on (`output` records: the recovered
student of prune, not the pruned one before recovery; the GPTQ student of quantize; every ONNX form
of export), by default of the last stage that produced a student; a stage that made no student
(finetune_teacher) is checked on its teachers. Each must keep `retention >= min_retention`.

With a baseline run, each is compared with the record of the same stage, model, form and backend there,
example by example: drop = baseline score - this run's score (the primary metric, over the same eval
examples), with its paired bootstrap interval at `confidence` (`compress.stats.drop_ci`). The rule:
FAIL only when the drop is significant (the whole interval lies above 0) AND the drop is larger than
`max_drop`; a drop within noise, or a significant one no larger than `max_drop`, passes.

Bad input (no run, no results, unknown stage, a confidence outside (0, 1), a baseline without per-example
scores or with a different number of eval examples) is a CompressError: exit 2.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compress import results, stats
from compress.errors import CompressError, Problem
from compress.records import Record


@dataclass(frozen=True)
class Check:
    record: str
    """stage, model and backend of the record checked."""
    what: str
    """The rule, e.g. `retention >= 0.900`."""
    value: str
    """What was measured."""
    passed: bool


def produced_students(records: list[Record], stage: str) -> list[Record]:
    """The students `stage` hands on, measured."""
    return [r for r in records if r.stage == stage and r.role == "student" and r.output and r.score is not None]


def default_stage(records: list[Record]) -> str | None:
    """The last stage that produced a student (with an accuracy): the run's final student."""
    stages = [r.stage for r in records if produced_students(records, r.stage)]
    return stages[-1] if stages else None


def pick(records: list[Record], stage: str | None, run_dir: Path) -> tuple[str, list[Record]]:
    """The stage checked and its records: the students it hands on, else (no student) its teachers."""
    stages = list(dict.fromkeys(r.stage for r in records))
    stage = stage or default_stage(records)
    if stage is None:
        raise CompressError(Problem("RUN", str(run_dir), "no student record has an accuracy to gate on: run with "
                                    "eval.accuracy=true on a labelled task"))
    chosen = [r for r in records if r.stage == stage]
    if not chosen:
        raise CompressError(Problem("--stage", stage, f"no such stage in this run; its stages are {stages}"))
    return stage, produced_students(records, stage) or [r for r in chosen if r.role == "teacher" and r.output] or chosen


def checks(run_dir: Path, min_retention: float, stage: str | None = None, baseline: Path | None = None,
           max_drop: float = 0.01, max_perplexity_ratio: float | None = None,
           confidence: float = stats.CONFIDENCE) -> tuple[str, list[Check]]:
    """Load the run (and baseline) and evaluate every rule; bad input raises CompressError."""
    problems = []
    if not 0 < confidence < 1:
        problems.append(Problem("--confidence", confidence, "must be in (0, 1), e.g. 0.95 for a 95% interval"))
    if not 0 < min_retention <= 2:
        problems.append(Problem("--min-retention", min_retention, "must be in (0, 2], e.g. 0.9 for 90%"))
    if max_drop < 0:
        problems.append(Problem("--max-drop", max_drop, "must be >= 0, e.g. 0.01 for one accuracy point"))
    if max_perplexity_ratio is not None and not max_perplexity_ratio > 0:
        problems.append(Problem("--max-perplexity-ratio", max_perplexity_ratio, "must be > 0, e.g. 1.5 for a "
                                "student at most 50% more perplexed than the teacher"))
    if problems:
        raise CompressError(problems)
    records = [Record.from_dict(r) for r in results.load(run_dir)["records"]]
    stage, chosen = pick(records, stage, Path(run_dir))
    base_records = [Record.from_dict(r) for r in results.load(baseline)["records"]] if baseline is not None else None
    out = []
    for r in chosen:
        name = r.label
        ret = r.retention
        if ret is None:
            raise CompressError(Problem("--stage", stage, f"{name} has no retention (no accuracy measured, or no "
                                        "teacher accuracy): run with eval.accuracy=true"))
        out.append(Check(name, f"retention >= {min_retention:.3f}", results.with_interval(ret, r.retention_ci),
                         ret >= min_retention))
        if max_perplexity_ratio is not None:
            if r.perplexity_ratio is None:
                raise CompressError(Problem("--max-perplexity-ratio", max_perplexity_ratio, f"{name} has no "
                                            "perplexity ratio: run with eval.perplexity=true"))
            out.append(Check(name, f"perplexity / teacher <= {max_perplexity_ratio:g}", f"{r.perplexity_ratio:.4g}",
                             r.perplexity_ratio <= max_perplexity_ratio))
        if base_records is not None:
            out.append(_drop_check(name, r, base_records, Path(run_dir), baseline, max_drop, confidence))
    return stage, out


def _drop_check(name: str, r: Record, base_records: list[Record], run_dir: Path, baseline: Path, max_drop: float,
                confidence: float) -> Check:
    """The paired test of `r` against its baseline record (the rule is in the module docstring)."""
    b = _baseline_of(name, r, base_records, run_dir, baseline)
    drop, (low, high) = stats.drop_ci(b.example_scores, r.example_scores, confidence)
    significant = low > 0
    found = (f"significant drop of {drop:.3f} (CI {low:.3f}..{high:.3f})" if significant else
             f"no significant drop ({drop:+.3f}, CI {low:.3f}..{high:.3f})")
    return Check(name, f"{r.metric} vs baseline: no significant drop > {max_drop:.3f} ({confidence:.0%} CI)",
                 f"{r.score:.3f} vs {b.score:.3f}: {found}", not (significant and drop > max_drop))


def _baseline_of(name: str, r: Record, base_records: list[Record], run_dir: Path, baseline: Path) -> Record:
    """The baseline's record of the same stage, model, form and backend, scored on as many examples as `r`."""
    key = lambda x: (x.stage, x.role, x.model, x.variant, x.backend)  # noqa: E731
    match = [b for b in base_records if key(b) == key(r)]
    if not match or match[0].score is None or r.score is None:
        raise CompressError(Problem("--baseline", str(baseline), f"has no {r.metric} for {name}: compare runs of "
                                    "the same pipeline"))
    b = match[0]
    for run, rec in ((baseline, b), (run_dir, r)):
        if not rec.example_scores:
            raise CompressError(Problem("--baseline", str(baseline), f"{run} keeps no per-example scores for {name} "
                                        "(made by an older compress): rerun it to compare runs example by example"))
    if len(b.example_scores) != len(r.example_scores):
        raise CompressError(Problem("--baseline", str(baseline), f"evaluated {len(b.example_scores)} examples for "
                                    f"{name}, but {run_dir} evaluated {len(r.example_scores)}: compare runs on the "
                                    "same eval examples (same data and data.eval_size)"))
    return b


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
    Console(file=buf, width=200, color_system=None).print(t)
    return buf.getvalue()
