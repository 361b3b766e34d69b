"""The stage table: every stage of a pipeline, in the order a full pipeline runs them.

A stage is a module of this package, read top to bottom as its recipe: NAME, the roles it
CONSUMES and PRODUCES, the config KEYS it depends on, a SUMMARY, `check(cfg)` (its config
section, checked for every pipeline), `preflight(cfg)` where it needs something to run here
(packages, enough data, a family that supports it; checked when it is in the pipeline),
`run(cfg, src, out)` and `reevaluate(cfg, src, path)`.
Nothing here imports the pipeline, the report or the gate.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from compress.stages import distill, evaluate, export, finetune_teacher, prune, quantize

ROLES = {"teacher": "a teacher (the reference that retention is measured against)",
         "student": "a student (the model to compress)"}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable
    """run(cfg, src: Artifact, out: Path) -> metrics: reads only `src`, writes only `out`."""
    reevaluate: Callable
    """Measures the finished stage's models again: a change of `eval` settings alone re-measures."""
    keys: tuple[str, ...]
    """Config sections whose values the stage depends on: a change in one reruns it."""
    consumes: tuple[str, ...]
    """Roles it reads from its input artifact."""
    produces: tuple[str, ...]
    """Roles it replaces in the artifact it hands on (the others pass through)."""
    summary: str
    check: Callable
    """check(cfg) -> problems of its config section (every pipeline: a typo fails at load time)."""
    preflight: Callable
    """preflight(cfg) -> problems running it here (missing packages, too little data): only in the pipeline."""


def _stage(m: ModuleType) -> Stage:
    return Stage(m.NAME, m.run, m.reevaluate, m.KEYS, m.CONSUMES, m.PRODUCES, m.SUMMARY, m.check,
                 getattr(m, "preflight", lambda cfg: []))


STAGES: dict[str, Stage] = {s.name: s for s in map(_stage, [evaluate, finetune_teacher, distill, prune, quantize,
                                                            export])}
