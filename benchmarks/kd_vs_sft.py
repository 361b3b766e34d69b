"""Does distillation, not just more training, earn the student's accuracy?

Part 1 trains the same student (same init, data budget, steps, batch, learning rate) from one fine-tuned
teacher per task, once per variant and seed:
  sft           hard labels only (gold labels of the `train` split)
  pseudo        the teacher's pseudo-labels only (the `unlabeled` split)
  kd            soft labels + pseudo-labels (the `unlabeled` split), plus the preset's hidden-state term
  kd_on_policy  kd, with half the steps on answers the student samples itself and the teacher scores (GKD)
  kd_auto_layers  kd, the student's layers chosen by measured importance (`student.keep_layers=auto`)
  kd_synthetic  kd, the transfer set grown by as many inputs again written by the teacher
                (`data.synthetic_unlabeled` = `data.unlabeled_size`)
and prints each variant's score (accuracy, or F1 on a generative task) as mean +- standard error over the
seeds, with its difference to sft in standard errors.

Part 2 (`--finetune-methods`) measures time per step and peak memory of teacher fine-tuning with QLoRA
(NF4), LoRA on a bf16 base and LoRA on an fp32 base, each in its own process, as ratios to QLoRA.

    python benchmarks/kd_vs_sft.py                                   # both tasks, 3 seeds, every variant
    python benchmarks/kd_vs_sft.py distill.max_steps=150 --tasks rotten_tomatoes --seeds 1 2 3
    python benchmarks/kd_vs_sft.py --tasks rotten_tomatoes --teacher-artifact runs/NAME/01_finetune_teacher

Overrides are `compress run` overrides, applied to every task. Writes benchmarks/results/kd_vs_sft.json as
{"tasks": {TASK: {VARIANT: {"scores": [one per seed], "seeds": [...], "mean": ..., "stderr": ...}}}};
finished runs already in that file (same task, variant, seed and overrides) are kept, not rerun.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

from squad import PRESET as SQUAD_PRESET

TASKS = {"rotten_tomatoes": [], "squad": [o for o in SQUAD_PRESET if not o.startswith("distill.")]}
"""Overrides of each task (squad: the sizes of benchmarks/squad.py; its step counts come from the command)."""
VARIANTS = {  # sft and pseudo read nothing of the teacher's but its answers: no hidden-state term either
    "sft": {"distill.soft_weight": 0.0, "distill.pseudo_weight": 0.0, "distill.hard_weight": 1.0,
            "distill.hidden_weight": 0.0},
    "pseudo": {"distill.soft_weight": 0.0, "distill.pseudo_weight": 1.0, "distill.hard_weight": 0.0,
               "distill.hidden_weight": 0.0},
    "kd": {"distill.soft_weight": 1.0, "distill.pseudo_weight": 1.0, "distill.hard_weight": 0.0},
    "kd_on_policy": {"distill.soft_weight": 1.0, "distill.pseudo_weight": 1.0, "distill.hard_weight": 0.0,
                     "distill.on_policy_ratio": 0.5, "distill.topk_cache": 0},  # the teacher scores the student's answers
    "kd_auto_layers": {"distill.soft_weight": 1.0, "distill.pseudo_weight": 1.0, "distill.hard_weight": 0.0,
                       "student.keep_layers": "auto"},
    "kd_synthetic": {"distill.soft_weight": 1.0, "distill.pseudo_weight": 1.0, "distill.hard_weight": 0.0,
                     "data.synthetic_unlabeled": "${data.unlabeled_size}"},
}
"""Loss settings of each variant; everything else (steps, batch, lr, hidden-state weight of `kd`) is the preset's."""
METHODS = {"qlora": ["teacher.method=qlora"], "lora-bf16": ["teacher.method=lora", "teacher.dtype=bfloat16"],
           "lora-fp32": ["teacher.method=lora", "teacher.dtype=float32"]}


def teacher_run(overrides: list[str], root: Path, name: str):
    """Run evaluate -> finetune_teacher in root/name (skipped when already done there, as any
    `compress run` rerun is); return (cfg, the finetune_teacher artifact)."""
    from compress.artifact import Artifact
    from compress.config import given_keys, load_config
    from compress.pipeline import preflight, run_pipeline

    # the variants compare training signals in full precision (the int4 rounding of the default preset's
    # last steps is the export's concern); an override given on the command line still wins
    cfg = load_config(["distill.quant_aware_steps=0"] + overrides + ["pipeline=full", f"run.root={root}",
                                                                     f"run.name={name}"])
    preflight(cfg, given_keys(overrides))
    cfg.pipeline.stages = ["evaluate", "finetune_teacher"]
    run = run_pipeline(cfg)
    return cfg, Artifact.load(run / "01_finetune_teacher")


def train_variant(cfg, src, name: str, seed: int) -> dict:
    """The distill stage with one variant's loss settings and `run.seed=seed`, into <run>/kd_vs_sft-<name>-s<seed>."""
    import shutil

    from omegaconf import OmegaConf

    from compress.records import ratio
    from compress.stages import distill

    cfg = copy.deepcopy(cfg)
    for key, value in {**VARIANTS[name], "run.seed": seed}.items():
        OmegaConf.update(cfg, key, value)
    out = src.path.parent / f"kd_vs_sft-{name}-s{seed}"  # inside the run: pseudo-labels are shared via its cache/
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    metrics = distill.run(cfg, src, out)
    record, teacher = metrics["records"][0], src.metrics()["records"][0]  # the fine-tuned teacher's record
    metric = cfg.data.metric
    return {"variant": name, "seed": seed, "metric": metric, "score": record[metric],
            "agreement": record.get("agreement"), "retention": ratio(record[metric], teacher[metric]),
            "perplexity": record.get("perplexity"), "train_examples": metrics["train_items"],
            "wall_s": time.perf_counter() - t0}


def summary(runs: list[dict]) -> dict:
    """Mean and standard error (sample standard deviation / sqrt(n)) of the runs' scores."""
    scores = [r["score"] for r in runs]
    mean = sum(scores) / len(scores)
    var = sum((x - mean) ** 2 for x in scores) / (len(scores) - 1) if len(scores) > 1 else float("nan")
    return {"scores": scores, "seeds": [r["seed"] for r in runs], "mean": mean, "stderr": math.sqrt(var / len(scores)),
            "runs": runs}


def versus(a: dict, b: dict) -> tuple[float, float]:
    """a - b and that difference in standard errors (independent runs: sqrt(se_a^2 + se_b^2))."""
    diff, se = a["mean"] - b["mean"], math.hypot(a["stderr"], b["stderr"])
    return diff, diff / se if se > 0 else float("nan")


def probe(method: str, overrides: list[str], steps: int) -> dict:
    """In this process: `steps` fine-tuning steps of the teacher; time per step (after the first) and peak RSS."""
    import torch

    from compress import training
    from compress.config import load_config
    from compress.data import load_splits
    from teachers import finetune, loading

    cfg = load_config(overrides + METHODS[method])
    splits = load_splits(cfg.data)
    model, tok = finetune.trainable_model(loading.resolve(cfg.teacher, "teacher"), cfg.teacher)
    items = training.encode_examples(tok, cfg.data, [e.text for e in splits.train][: cfg.finetune.batch_size * steps],
                                     [splits.answer(e) for e in splits.train], cfg.finetune.max_length)
    module = finetune.FinetuneModule(model, cfg.finetune)
    opt = module.configure_optimizers()["optimizer"]
    times = []
    for batch in training.loader(items, cfg.finetune.batch_size, tok.pad_token_id, shuffle=False):
        t0 = time.perf_counter()
        loss = module._loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return {"method": method, "s_per_step": sum(times[1:]) / max(1, len(times) - 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "torch": torch.__version__}


def methods_table(overrides: list[str], steps: int) -> list[dict]:
    rows = []
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--probe", method, "--steps", str(steps), *overrides],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"method": method, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["method"] == "qlora" and "error" not in r), None)
    for r in rows:
        if base and "error" not in r:
            r["time_vs_qlora"] = r["s_per_step"] / base["s_per_step"]
            r["memory_vs_qlora"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def print_tables(tasks: dict, methods: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    tables = []
    for task, variants in tasks.items():
        metric = next(iter(variants.values()))["runs"][0]["metric"]
        t = Table(title=f"{task}: the same student, data budget and steps ({metric}, mean +- standard error over seeds)")
        for col in ("variant", metric, "seeds", "- sft", "in SE", "agreement", "retention", "wall s / run"):
            t.add_column(col, justify="right")
        for name, v in variants.items():
            diff, z = versus(v, variants["sft"]) if "sft" in variants and name != "sft" else (float("nan"),) * 2
            runs = v["runs"]
            agree = [r["agreement"] for r in runs if r["agreement"] is not None]
            ret = [r["retention"] for r in runs if r["retention"] is not None]
            t.add_row(name, f"{v['mean']:.3f} +- {v['stderr']:.3f}", " ".join(f"{x:.3f}" for x in v["scores"]),
                      "" if math.isnan(diff) else f"{diff:+.3f}", "" if math.isnan(z) else f"{z:+.1f}",
                      f"{sum(agree) / len(agree):.3f}" if agree else "",
                      f"{sum(ret) / len(ret):.3f}" if ret else "",
                      f"{sum(r['wall_s'] for r in runs) / len(runs):.0f}")
        tables.append(t)
    if methods:
        m = Table(title="teacher fine-tuning: time per step and peak memory, ratios to QLoRA (one run)")
        for col in ("method", "s/step", "peak RSS MB", "time x", "memory x", "trainable"):
            m.add_column(col, justify="right")
        for r in methods:
            if "error" in r:
                m.add_row(r["method"], "error", str(r["error"]), "", "", "")
                continue
            m.add_row(r["method"], f"{r['s_per_step']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['time_vs_qlora']:.2f}",
                      f"{r['memory_vs_qlora']:.2f}", f"{r['trainable_params'] / 1e6:.2f} M")
        tables.append(m)
    Console(width=140).print(*tables)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["sft", "pseudo", "kd", "kd_on_policy"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="run.seed of each student run")
    p.add_argument("--root", default="runs", help="run.root of the teacher runs")
    p.add_argument("--run-name", default="bench-kd_vs_sft",
                   help="run.name prefix of the teacher runs (NAME-TASK); an existing run with the same config is reused")
    p.add_argument("--teacher-artifact", help="a finished finetune_teacher stage folder to reuse (one task, run with "
                   "the same overrides); skips the teacher run")
    p.add_argument("--finetune-methods", action="store_true", help="also run part 2 (teacher fine-tuning methods)")
    p.add_argument("--steps", type=int, default=6, help="fine-tuning steps per method in part 2")
    p.add_argument("--probe", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/kd_vs_sft.json")
    args = p.parse_args()
    from compress.cli import _quiet
    from compress.results import hardware

    _quiet()
    if args.probe:
        print(json.dumps(probe(args.probe, args.overrides, args.steps)))
        return 0
    if args.teacher_artifact and len(args.tasks) != 1:
        p.error("--teacher-artifact is one task's teacher: name that task alone with --tasks")
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    done = {(r["task"], r["variant"], r["seed"]): r for r in old.get("runs", [])
            if r.get("overrides") == args.overrides}
    result = {"overrides": args.overrides, "hardware": hardware(), "runs": list(done.values()),
              "finetune_methods": old.get("finetune_methods", []), "teachers": old.get("teachers", {})}
    for task in args.tasks:
        overrides = TASKS[task] + args.overrides
        if args.teacher_artifact:
            from compress.artifact import Artifact
            from compress.config import load_config

            cfg, src = load_config(overrides), Artifact.load(Path(args.teacher_artifact))
        else:
            cfg, src = teacher_run(overrides, Path(args.root), f"{args.run_name}-{task}")
        result["teachers"][task] = src.metrics()["records"][0]
        for seed in args.seeds:
            for name in args.variants:
                if (task, name, seed) in done:
                    continue
                run = {"task": task, "overrides": args.overrides, "load_average": hardware()["load_average"],
                       **train_variant(cfg, src, name, seed)}
                result["runs"].append(run)
                _write(out, result)  # after every run: an interrupted benchmark keeps what it measured
    if args.finetune_methods:
        result["finetune_methods"] = methods_table(args.overrides, args.steps)
    _write(out, result)
    print_tables(result["tasks"], result["finetune_methods"] if args.finetune_methods else [])
    print(f"wrote {out}")
    return 0


def _write(out: Path, result: dict) -> None:
    """The runs grouped as tasks -> variants -> {scores, mean, stderr}, written to `out`."""
    tasks: dict = {}
    for r in result["runs"]:
        tasks.setdefault(r["task"], {}).setdefault(r["variant"], []).append(r)
    result["tasks"] = {t: {v: summary(sorted(rs, key=lambda r: r["seed"])) for v, rs in vs.items()}
                       for t, vs in tasks.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
