"""Stage `prune`: structured pruning of the student (torch-pruning), then recovery distillation.

Consumes: the student (the input's student role: the distilled student, or the configured one after
`evaluate`) and the teacher (the recovery distils the reference teacher). Produces: the recovered
student (`model/`); the teacher is handed on.
Pruning alone collapses accuracy, so a short distillation from the reference teacher follows (the
`distill` stage's training, on the pruned model, with `prune.recovery_*`). Two records: the pruned
student before recovery (`pruned/`, an intermediate) and after (`model/`, what the stage hands on).
What is removed and how importance is scored: `students/prune.py`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from compress.artifact import Artifact
from compress.console import say
from compress.data import load_splits
from compress.errors import Problem
from compress.measure import carry, measure_student
from compress.stages import distill as distill_stage
from students import prune
from teachers import loading

NAME = "prune"
CONSUMES = ("teacher", "student")
PRODUCES = ("student",)
KEYS = ("teacher", "student", "data", "prune", "distill", "trainer", "run.seed")
SUMMARY = ("structured pruning (torch-pruning: MLP units, GQA-aware heads, layers), then recovery distillation; "
           "evaluated before and after recovery")


def check(cfg) -> list[Problem]:
    """The `prune` section (what needs the model itself is checked in `run`, before pruning)."""
    p = cfg.prune
    problems = [Problem(f"prune.{k}", p[k], "must be in [0, 1): the fraction removed (0 removes nothing)")
                for k in ("mlp_ratio", "head_ratio") if not 0 <= p[k] < 1]
    if p.heads not in prune.HEADS:
        problems.append(Problem("prune.heads", p.heads, f"choose one of: {', '.join(prune.HEADS)}"))
    if p.importance not in prune.IMPORTANCE:
        problems.append(Problem("prune.importance", p.importance, f"choose one of: {', '.join(prune.IMPORTANCE)}"))
    if not p.targets:
        problems.append(Problem("prune.targets", list(p.targets), "name the MLP's input projections, "
                                "e.g. [gate_proj, up_proj]"))
    for k in ("round_to", "calibration_batches", "calibration_batch_size"):
        if p[k] < 1:
            problems.append(Problem(f"prune.{k}", p[k], "must be >= 1"))
    if p.recovery_steps < 0:
        problems.append(Problem("prune.recovery_steps", p.recovery_steps, "must be >= 0"))
    if not p.recovery_lr > 0:
        problems.append(Problem("prune.recovery_lr", p.recovery_lr, "must be > 0, e.g. 2e-4"))
    if any(i < 0 for i in p.drop_layers):
        problems.append(Problem("prune.drop_layers", list(p.drop_layers), "layer indices are 0-based (>= 0)"))
    return problems


def preflight(cfg) -> list[Problem]:
    """In the pipeline: what the student's family cannot do (Phi-3 fuses q, k and v: no head pruning)."""
    p = cfg.prune
    if p.heads == "none" or p.head_ratio == 0:
        return []
    role = "teacher" if cfg.student.from_teacher and not cfg.student.path else "student"  # whose family it is
    config = json.loads((loading.resolve(cfg[role], role) / "config.json").read_text())
    if config.get("model_type") == "phi3":
        return [Problem("prune.heads", p.heads, "the student is a Phi-3, whose fused qkv_proj head pruning does not "
                        "split; set prune.heads=none (MLP units and whole layers prune fine)")]
    return []


def run(cfg, src: Artifact, out: Path) -> dict:
    torch.manual_seed(cfg.run.seed)
    splits = load_splits(cfg.data)
    teacher, source = src.teacher(), Path(src.student()["path"])
    model, tok = loading.load(source, cfg.student, "student")
    model.float()  # gradients and pruning in fp32
    prune.check(model, cfg.prune)
    params_before = sum(p.numel() for p in model.parameters())
    say(f"  pruning {cfg.student.name} ({source}, {params_before / 1e6:.1f} M params, {cfg.prune.importance} "
        "importance)")
    shapes = prune.prune(model, tok, cfg, splits)
    params_after = sum(p.numel() for p in model.parameters())
    say(f"  {shapes['before']} -> {shapes['after']}: {params_after / 1e6:.1f} M params")
    pruned = out / "pruned"
    model.save_pretrained(pruned, safe_serialization=True)
    tok.save_pretrained(pruned)
    del model
    records = [measure_student(cfg, NAME, pruned, splits, teacher, variant="pruned", output=False)]
    if cfg.prune.recovery_steps > 0:
        say(f"  recovery: distilling the reference teacher into the pruned student for "
            f"{cfg.prune.recovery_steps} steps")
        if distill_stage.train(_recovery_config(cfg, pruned), _recovery_schedule(cfg), Path(teacher["path"]),
                               pruned, splits, out) is None:
            return {}  # ranks > 0 only train
        records.append(measure_student(cfg, NAME, out / "model", splits, teacher, variant="recovered"))
    else:  # nothing to recover: the pruned model is the one handed on (measured once)
        shutil.copytree(pruned, out / "model")
        records.append(replace(records[0], variant="recovered", output=True, path=str(out / "model")))
    return {"records": [r.to_dict() for r in records], "input_model": str(source), "shapes": shapes,
            "params_before": params_before, "params_after": params_after,
            "roles": carry(src, out, student={"path": out / "model", "name": cfg.student.name})}


def reevaluate(cfg, src: Artifact, path: Path) -> dict:
    """Measure the pruned and the recovered student again (the evaluation settings changed)."""
    splits, teacher = load_splits(cfg.data), src.teacher()
    return {"records": [measure_student(cfg, NAME, path / "pruned", splits, teacher, "pruned", False).to_dict(),
                        measure_student(cfg, NAME, path / "model", splits, teacher, "recovered").to_dict()]}


def _recovery_config(cfg, pruned: Path):
    """The job's config with the student pointed at the pruned model (a model of its own now)."""
    return OmegaConf.merge(cfg, {"student": {"path": str(pruned), "from_teacher": False, "random": None,
                                             "hub_id": None, "gguf_package": None}})


def _recovery_schedule(cfg):
    """The `distill` loss settings with the recovery schedule. With the hidden-state term the teacher runs on
    the fly (no top-K cache): a few recovery steps cost less than the pass that would keep its states. With
    `distill.quant_aware_steps`, the last as many recovery steps (at most all) train through the int4 weights
    again: the pruned student is rounded anew."""
    p, d = cfg.prune, cfg.distill
    return OmegaConf.merge(d, {"max_steps": p.recovery_steps, "lr": p.recovery_lr,
                               "quant_aware_steps": min(d.quant_aware_steps, p.recovery_steps),
                               "warmup_steps": min(d.warmup_steps, p.recovery_steps // 10), "val_every": 0,
                               "topk_cache": 0 if d.hidden_weight > 0 else d.topk_cache})
