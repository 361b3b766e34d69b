"""Measuring a model folder the way every stage does, and the roles an artifact hands on.

Every stage that makes a model measures it with `measure_folder` (PyTorch) or builds its
`Record` from a backend's measurement with `Record.of`; `roles` writes what the next stage
reads: which model is the teacher (the reference: folder, accuracy, predictions) and which
the student.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from compress.artifact import Artifact
from compress.evaluate import evaluate_torch, peak_memory, weights_size_mb
from compress.records import Record
from teachers import loading


def evaluate_folder(folder: Path, model_cfg, role: str, splits, cfg, reference=None) -> dict:
    """Load one model from `folder` and measure it; the measurement includes load time and memory."""
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    t0 = time.perf_counter()
    with peak_memory(loading.pick_device(model_cfg.device)) as mem:
        model, tokenizer = loading.load(folder, model_cfg, role)
        measured = evaluate_torch(model, tokenizer, splits, cfg.data, cfg.eval, reference, role)
        del model
    measured.update(peak_mem_mb=mem["peak_mem_mb"], size_mb=weights_size_mb(folder), eval_s=time.perf_counter() - t0)
    return measured


def measure_student(cfg, stage: str, folder: Path, splits, teacher: dict, variant: str = "",
                    output: bool = True) -> Record:
    """Measure `folder` as the student (in PyTorch) against the reference `teacher` role."""
    measured = evaluate_folder(folder, cfg.student, "student", splits, cfg, teacher.get("predictions"))
    return Record.of(stage, "student", cfg.student.name, measured, path=str(folder), variant=variant, output=output)


def portable(path: Path, out: Path) -> str:
    """A path as an artifact stores it: relative to the artifact when inside the same run, else absolute."""
    path = Path(path).resolve()
    if path.is_relative_to(out.resolve().parent):
        return os.path.relpath(path, out.resolve())
    return str(path)


def roles(out: Path, teacher: dict, student: dict | None) -> dict:
    """The `roles` entry of an artifact's metrics.json: teacher (the reference) and student, paths
    portable. `teacher` holds path, name, accuracy, base_accuracy, predictions; `student` path and name."""
    def place(role: dict | None) -> dict | None:
        return None if role is None else {**role, "path": portable(Path(role["path"]), out)}

    return {"teacher": place(teacher), "student": place(student)}


def carry(src: Artifact, out: Path, teacher: dict | None = None, student: dict | None = None) -> dict:
    """The input's roles, re-expressed for `out`, with the ones this stage replaced."""
    return roles(out, teacher or src.teacher(), student if student is not None else src.student())
