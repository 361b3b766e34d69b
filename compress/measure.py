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
from compress.calibrate import calibrate
from compress.console import say
from compress.evaluate import evaluate_torch, peak_memory, weights_size_mb
from compress.records import Record
from teachers import loading


def evaluate_folder(folder: Path, model_cfg, role: str, splits, cfg, reference=None) -> dict:
    """Load one model from `folder` and measure it, on the CPU with its fastest settings (`speed`); the
    measurement includes load time and memory, and the settings used. Torch's thread count is restored."""
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        with peak_memory(loading.pick_device(model_cfg.device)) as mem:
            model, tokenizer = loading.load(folder, model_cfg, role)
            settings = speed(model, folder, model_cfg, cfg.eval, model_cfg.get("name") or role)
            measured = evaluate_torch(model, tokenizer, splits, cfg.data, cfg.eval, reference, role)
            del model
    finally:
        torch.set_num_threads(threads)
    measured.update(peak_mem_mb=mem["peak_mem_mb"], size_mb=weights_size_mb(folder), eval_s=time.perf_counter() - t0,
                    **settings)
    return measured


def speed(model, folder: Path, model_cfg, eval_cfg, name: str) -> dict:
    """Threads, attention implementation and dtype for measuring `model`: on the CPU calibrated (timed per
    candidate, cached; compress.calibrate) unless `eval.calibrate=false`; the settings, as records carry them."""
    if eval_cfg.threads:
        torch.set_num_threads(eval_cfg.threads)
    device = next(model.parameters()).device
    if device.type == "cpu" and eval_cfg.calibrate:
        choice = calibrate(model, folder, model_cfg, eval_cfg, loading.folder_fingerprint(folder))
        timed = {k: v for k, v in choice["timings"].items() if isinstance(v, float)}
        how = "cached" if choice["cached"] else (f"fastest of {len(timed)}: " + ", ".join(
            f"{k} {v * 1000:.0f} ms" for k, v in sorted(timed.items(), key=lambda kv: kv[1])) if timed else "fixed")
        say(f"  {name}: {choice['threads']} threads, {choice['attn_implementation']} attention, {choice['dtype']} "
            f"({how})")
    return {"threads": torch.get_num_threads(), "attn_implementation": model.config._attn_implementation,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


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
