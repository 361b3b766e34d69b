"""Helpers for users' own pytest suites.

    from compress.testing import assert_retention

    def test_student_keeps_accuracy():
        assert_retention("runs/nightly", min_retention=0.9)
"""
from __future__ import annotations

from pathlib import Path

from compress import gate


def assert_retention(run_dir: str | Path, min_retention: float = 0.9, stage: str | None = None,
                     baseline: str | Path | None = None, max_drop: float = 0.01,
                     max_perplexity_ratio: float | None = None, confidence: float = 0.95) -> None:
    """Raise AssertionError (with the `compress check` table) unless the stage keeps `min_retention`.

    `stage` defaults to the run's last stage that produced a student; `baseline` another run, against which
    a drop fails only when it is significant (paired bootstrap at `confidence`) and larger than `max_drop`;
    `max_perplexity_ratio` caps perplexity / teacher's. Bad input raises `compress.errors.CompressError`.
    """
    run_dir = Path(run_dir)
    stage, rows = gate.checks(run_dir, min_retention, stage, Path(baseline) if baseline else None, max_drop,
                              max_perplexity_ratio, confidence)
    if not all(c.passed for c in rows):
        raise AssertionError("\n" + gate.render(gate.table(run_dir, stage, rows)))
