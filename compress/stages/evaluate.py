"""Stage `evaluate`: score the teacher and the student as they are.

The teacher's predictions become the reference for every agreement figure, and its
accuracy the denominator of every retention figure.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from compress.artifact import Artifact, write_json
from compress.console import say
from compress.data import load_splits
from compress.evaluate import evaluate_torch, peak_memory, weights_size_mb
from students import build as student_build
from teachers import loading


def evaluate_folder(folder: Path, model_cfg, role: str, splits, cfg, reference=None) -> dict:
    """Load one model from `folder` and measure it; the record includes load time and memory."""
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    t0 = time.perf_counter()
    with peak_memory(loading.pick_device(model_cfg.device)) as mem:
        model, tokenizer = loading.load(folder, model_cfg, role)
        record = evaluate_torch(model, tokenizer, splits, cfg.data, cfg.eval, reference, role)
        del model
    record.update(peak_mem_mb=mem["peak_mem_mb"], size_mb=weights_size_mb(folder), wall_s=time.perf_counter() - t0)
    return record


def run(cfg, src: Artifact, out: Path) -> dict:
    torch.manual_seed(cfg.run.seed)
    splits = load_splits(cfg.data)
    say(f"  data: {cfg.data.name} {splits.sizes()}")
    teacher_dir = loading.resolve(cfg.teacher, "teacher")
    say(f"  teacher: {cfg.teacher.name} ({teacher_dir})")
    teacher = evaluate_folder(teacher_dir, cfg.teacher, "teacher", splits, cfg)
    student_dir = student_build.resolve(cfg.student, teacher_dir)
    say(f"  student: {cfg.student.name} ({student_dir})")
    student = evaluate_folder(student_dir, cfg.student, "student", splits, cfg, teacher.get("predictions"))
    write_json(out / "predictions.json", {"labels": [e.label for e in splits.eval],
                                          "teacher": teacher.pop("predictions", None),
                                          "student": student.pop("predictions", None)})
    records = []
    for role, model_cfg, folder, record in (("teacher", cfg.teacher, teacher_dir, teacher),
                                            ("student", cfg.student, student_dir, student)):
        records.append({"stage": "evaluate", "role": role, "model": model_cfg.name, "backend": "torch",
                        "path": str(folder), **record})
    if "accuracy" in teacher and "accuracy" in student:
        records[1]["retention"] = student["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else None
        records[0]["retention"], records[0]["agreement"] = 1.0, 1.0
    return {"records": records, "splits": splits.sizes()}
