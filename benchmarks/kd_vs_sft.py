"""Does distillation, not just more training, earn the student's accuracy?

Part 1 trains the same student (same init, steps, batch, learning rate) three ways from one
fine-tuned teacher:
  sft     hard labels only (gold labels of the `train` split)
  pseudo  the teacher's pseudo-labels only (the `unlabeled` split)
  kd      soft labels + pseudo-labels (the `unlabeled` split), plus the preset's hidden-state term
and reports accuracy, agreement with the teacher and retention.

Part 2 measures time per step and peak memory of teacher fine-tuning with QLoRA (NF4),
LoRA on a bf16 base and LoRA on an fp32 base, each in its own process, as ratios to QLoRA.

    python benchmarks/kd_vs_sft.py                         # the embedded SmolLM2 job
    python benchmarks/kd_vs_sft.py teacher=tiny-random student=tiny-random data.eval_size=50 ...

Overrides are `compress run` overrides. Writes benchmarks/results/kd_vs_sft.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # sft and pseudo read nothing of the teacher's but its answers: no hidden-state term either
    "sft": {"distill.soft_weight": 0.0, "distill.pseudo_weight": 0.0, "distill.hard_weight": 1.0,
            "distill.hidden_weight": 0.0},
    "pseudo": {"distill.soft_weight": 0.0, "distill.pseudo_weight": 1.0, "distill.hard_weight": 0.0,
               "distill.hidden_weight": 0.0},
    "kd": {"distill.soft_weight": 1.0, "distill.pseudo_weight": 1.0, "distill.hard_weight": 0.0},
}
"""Loss weights of each variant; everything else (steps, batch, lr, hidden-state weight of `kd`) is the preset's."""
METHODS = {"qlora": ["teacher.method=qlora"], "lora-bf16": ["teacher.method=lora", "teacher.dtype=bfloat16"],
           "lora-fp32": ["teacher.method=lora", "teacher.dtype=float32"]}


def teacher_run(overrides: list[str], root: Path, name: str):
    """Run evaluate -> finetune_teacher in root/teacher (skipped when already done there, as any
    `compress run` rerun is); return (cfg, the finetune_teacher artifact)."""
    from compress.artifact import Artifact
    from compress.config import given_keys, load_config
    from compress.pipeline import preflight, run_pipeline

    cfg = load_config(overrides + ["pipeline=full", f"run.root={root}", f"run.name={name}"])
    preflight(cfg, given_keys(overrides))
    cfg.pipeline.stages = ["evaluate", "finetune_teacher"]
    run = run_pipeline(cfg)
    return cfg, Artifact.load(run / "01_finetune_teacher")


def train_variant(cfg, src, name: str) -> dict:
    """The distill stage with one variant's loss weights, into root/<name>."""
    import shutil

    from omegaconf import OmegaConf

    from compress.records import ratio
    from compress.stages import distill

    cfg = copy.deepcopy(cfg)
    for key, value in VARIANTS[name].items():
        OmegaConf.update(cfg, key, value)
    out = src.path.parent / f"kd_vs_sft-{name}"  # inside the run: pseudo-labels are shared via its cache/
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    metrics = distill.run(cfg, src, out)
    record, teacher = metrics["records"][0], src.teacher()
    return {"variant": name, "accuracy": record["accuracy"], "agreement": record["agreement"],
            "retention": ratio(record["accuracy"], teacher["accuracy"]),
            "retention_base": ratio(record["accuracy"], teacher["base_accuracy"]),
            "perplexity": record.get("perplexity"), "train_examples": metrics["train_items"],
            "wall_s": time.perf_counter() - t0}


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


def print_tables(variants: list[dict], methods: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="same student, same steps: what the teacher's signal is worth")
    for col in ("variant", "accuracy", "agreement", "retention", "ret. base", "ppl", "train ex.", "wall s"):
        t.add_column(col, justify="right")
    for v in variants:
        t.add_row(v["variant"], f"{v['accuracy']:.3f}", f"{v['agreement']:.3f}", f"{v['retention']:.3f}",
                  f"{v['retention_base']:.3f}", f"{v['perplexity']:.1f}", str(v["train_examples"]), f"{v['wall_s']:.0f}")
    m = Table(title="teacher fine-tuning: time per step and peak memory, ratios to QLoRA (one run)")
    for col in ("method", "s/step", "peak RSS MB", "time x", "memory x", "trainable"):
        m.add_column(col, justify="right")
    for r in methods:
        if "error" in r:
            m.add_row(r["method"], "error", str(r["error"]), "", "", "")
            continue
        m.add_row(r["method"], f"{r['s_per_step']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['time_vs_qlora']:.2f}",
                  f"{r['memory_vs_qlora']:.2f}", f"{r['trainable_params'] / 1e6:.2f} M")
    Console(width=120).print(t, m)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--root", default="runs", help="run.root of the teacher run")
    p.add_argument("--run-name", default="bench-kd_vs_sft",
                   help="run.name of the teacher run; an existing run with the same config is reused")
    p.add_argument("--teacher-artifact", help="a finished finetune_teacher stage folder to reuse (run with the "
                   "same overrides); skips the teacher run")
    p.add_argument("--steps", type=int, default=6, help="fine-tuning steps per method in part 2")
    p.add_argument("--probe", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/kd_vs_sft.json")
    args = p.parse_args()
    from compress.cli import _quiet

    _quiet()
    if args.probe:
        print(json.dumps(probe(args.probe, args.overrides, args.steps)))
        return 0
    root = Path(args.root)
    if args.teacher_artifact:
        from compress.artifact import Artifact
        from compress.config import load_config

        cfg, src = load_config(args.overrides), Artifact.load(Path(args.teacher_artifact))
    else:
        cfg, src = teacher_run(args.overrides, root, args.run_name)
    variants = [train_variant(cfg, src, name) for name in VARIANTS]
    methods = methods_table(args.overrides, args.steps)
    print_tables(variants, methods)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from compress.results import hardware

    out.write_text(json.dumps({"hardware": hardware(), "variants": variants, "finetune_methods": methods,
                               "teacher": src.metrics()["records"][0]}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
