"""Stage `evaluate`, and the evaluation every other stage runs on the model it made.

The *reference* is the current teacher: its folder, accuracy and predictions. The
`evaluate` stage sets it to the base teacher; `finetune_teacher` moves it to the
fine-tuned teacher; later stages carry it forward. Every record's `agreement` and
`retention` are measured against it, and `retention_base` against the base teacher.
"""
from __future__ import annotations

import os
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
    record.update(peak_mem_mb=mem["peak_mem_mb"], size_mb=weights_size_mb(folder), eval_s=time.perf_counter() - t0)
    return record


def _ratio(a, b):
    return a / b if a is not None and b else None


def _record(stage: str, role: str, name: str, folder: Path, measured: dict, ref: dict | None) -> dict:
    rec = {"stage": stage, "role": role, "model": name, "backend": "torch", "path": str(folder), **measured}
    if ref is not None:
        rec["retention"] = _ratio(measured.get("accuracy"), ref.get("accuracy"))
        rec["retention_base"] = _ratio(measured.get("accuracy"), ref.get("base_accuracy"))
    return rec


def _portable(path: Path, out: Path) -> str:
    """A path as stored in an artifact: relative to it when inside the same run, else absolute."""
    path = path.resolve()
    if path.is_relative_to(out.resolve().parent):
        return os.path.relpath(path, out.resolve())
    return str(path)


def carry_reference(src: Artifact, out: Path) -> dict:
    """The input's reference, re-expressed for the new artifact folder."""
    ref = src.reference()
    return {**ref, "teacher": _portable(Path(ref["teacher"]), out)}


def run(cfg, src: Artifact, out: Path) -> dict:
    torch.manual_seed(cfg.run.seed)
    splits = load_splits(cfg.data)
    say(f"  data: {cfg.data.name} {splits.sizes()}")
    teacher_dir = loading.resolve(cfg.teacher, "teacher")
    say(f"  teacher: {cfg.teacher.name} ({teacher_dir})")
    teacher = evaluate_folder(teacher_dir, cfg.teacher, "teacher", splits, cfg)
    t_pred = teacher.pop("predictions", None)
    ref = {"teacher": _portable(teacher_dir, out), "name": cfg.teacher.name, "accuracy": teacher.get("accuracy"),
           "base_accuracy": teacher.get("accuracy"), "predictions": t_pred}
    student_dir = student_build.resolve(cfg.student, teacher_dir)
    say(f"  student: {cfg.student.name} ({student_dir})")
    student = evaluate_folder(student_dir, cfg.student, "student", splits, cfg, t_pred)
    write_json(out / "predictions.json", {"labels": [e.label for e in splits.eval], "teacher": t_pred,
                                          "student": student.pop("predictions", None)})
    if t_pred is not None:
        teacher["agreement"] = 1.0
    records = [_record("evaluate", "teacher", cfg.teacher.name, teacher_dir, teacher, ref),
               _record("evaluate", "student", cfg.student.name, student_dir, student, ref)]
    return {"records": records, "splits": splits.sizes(), "reference": ref}


def evaluate_new_teacher(cfg, src: Artifact, out: Path, splits, stage: str) -> dict:
    """Measure `out/model` as the new reference teacher (after fine-tuning)."""
    base = src.reference()
    measured = evaluate_folder(out / "model", cfg.teacher, "teacher", splits, cfg, base.get("predictions"))
    preds = measured.pop("predictions", None)
    record = _record(stage, "teacher", f"{cfg.teacher.name}:{cfg.teacher.method}", out / "model", measured,
                     {"accuracy": measured.get("accuracy"), "base_accuracy": base.get("base_accuracy")})
    record["agreement_base"] = measured.get("agreement")
    record["agreement"] = 1.0 if preds is not None else None
    ref = {"teacher": "model", "name": f"{cfg.teacher.name}:{cfg.teacher.method}", "accuracy": measured.get("accuracy"),
           "base_accuracy": base.get("base_accuracy"), "predictions": preds}
    return {"records": [record], "reference": ref}


def evaluate_new_student(cfg, src: Artifact, out: Path, splits, stage: str) -> dict:
    """Measure `out/model` as a student against the reference teacher carried from `src`."""
    ref = src.reference()
    measured = evaluate_folder(out / "model", cfg.student, "student", splits, cfg, ref.get("predictions"))
    measured.pop("predictions", None)
    record = _record(stage, "student", cfg.student.name, out / "model", measured, ref)
    return {"records": [record], "reference": carry_reference(src, out)}
