"""Stage `evaluate`: measure the teacher and the student as they are.

Consumes: nothing (it starts a pipeline). Produces: the teacher (the configured one, which becomes
the *reference* that agreement and retention are measured against, and the base teacher of
`retention_base`) and the student (the configured one: built from the teacher's layers, or a model
of its own), both measured.
Artifact: `predictions.json` (gold labels, the teacher's and the student's predictions; each example's
choices when they differ per example).
"""
from __future__ import annotations

from pathlib import Path

import torch

from compress.artifact import Artifact, write_json
from compress.console import say
from compress.data import load_splits
from compress.measure import evaluate_folder, roles
from compress.records import Record
from students import build as student_build
from teachers import loading

NAME = "evaluate"
CONSUMES: tuple[str, ...] = ()
PRODUCES = ("teacher", "student")
KEYS = ("teacher", "student", "data", "run.seed")
SUMMARY = "score teacher and student as they are: accuracy, agreement, perplexity, latency, size, memory"


def check(cfg) -> list:
    """Nothing beyond the shared config checks: evaluation settings are checked for every pipeline."""
    return []


def run(cfg, src: Artifact, out: Path) -> dict:
    torch.manual_seed(cfg.run.seed)
    splits = load_splits(cfg.data)
    say(f"  data: {cfg.data.name} {splits.sizes()}")
    teacher_dir = loading.resolve(cfg.teacher, "teacher")
    say(f"  teacher: {cfg.teacher.name} ({teacher_dir})")
    t = evaluate_folder(teacher_dir, cfg.teacher, "teacher", splits, cfg)
    t_pred = t.pop("predictions", None)
    if t_pred is not None:
        t["agreement"] = 1.0
    student_dir = student_build.resolve(cfg.student, teacher_dir, data=cfg.data, splits=splits)
    say(f"  student: {cfg.student.name} ({student_dir})")
    s = evaluate_folder(student_dir, cfg.student, "student", splits, cfg, t_pred)
    predictions = {"labels": [e.label for e in splits.eval], "teacher": t_pred, "student": s.pop("predictions", None)}
    if splits.generative:  # the references each answer was scored against
        predictions["references"] = [list(e.answers) for e in splits.eval]
    if any(e.choices is not None for e in splits.eval):  # a task whose examples have their own choices
        predictions["choices"] = [list(e.choices or ()) for e in splits.eval]
    write_json(out / "predictions.json", predictions)
    records = [Record.of(NAME, "teacher", cfg.teacher.name, t, path=str(teacher_dir), variant="base"),
               Record.of(NAME, "student", cfg.student.name, s, path=str(student_dir))]
    teacher = {"path": teacher_dir, "name": cfg.teacher.name, "accuracy": t.get("accuracy"),
               "base_accuracy": t.get("accuracy"), "predictions": t_pred}
    return {"records": [r.to_dict() for r in records], "splits": splits.sizes(),
            "roles": roles(out, teacher, {"path": student_dir, "name": cfg.student.name})}


reevaluate = run  # measuring is all this stage does
