"""What the run's two costliest passes cost, before and after the way they run now.

1. ONNX scoring: every exported folder of an `export` stage scores eval examples through its full graph
   (logits at every position) and through `compress.ort.gathered_graph` (the head only at the positions
   scoring reads); rounds alternate the two, and the accuracies must agree.
2. The pseudo-labelling pass: the teacher labels unlabeled reviews (with its top-32 and the hidden states
   the default student reads) under bf16 autocast at batch 8 (the former way), under autocast at batch 32,
   and with its weights cast to bf16 at batch 32 (`compress.training.cast_weights`, the way it runs now);
   labels are compared with an fp32 pass.

    python benchmarks/eval_cost.py runs/NAME [OVERRIDE...] --examples 200 --reviews 400 --rounds 2

RUN is a finished run with `01_finetune_teacher/` and an export stage; overrides are those it was made with.
Prints each as seconds and ratios measured in this one process, and writes benchmarks/results/eval_cost.json
with the load average at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def score_times(export_dir: Path, cfg, splits, rounds: int) -> dict:
    """Per exported folder: seconds to score the eval examples, full graph and gathered, and both accuracies."""
    from transformers import AutoTokenizer

    from compress import ort
    from compress.evaluate import score_accuracy

    out: dict = {}
    for _ in range(rounds):
        for folder in sorted(p.parent for p in export_dir.glob("*/model.onnx")):
            tok = AutoTokenizer.from_pretrained(folder)
            for gather in (False, True):
                lm = ort.OnnxLM.open(folder, torch.get_num_threads(), gather=gather)
                t0 = time.perf_counter()
                acc = score_accuracy(ort.logits_fn(lm), tok, splits, cfg.data, cfg.eval.batch_size, folder.name)
                row = out.setdefault(folder.name, {"full_s": [], "gathered_s": [], "accuracy": {}})
                row["gathered_s" if gather else "full_s"].append(time.perf_counter() - t0)
                row["accuracy"]["gathered" if gather else "full"] = acc["accuracy"]
    return out


def pass_times(teacher_dir: Path, cfg, splits, rounds: int) -> dict:
    """Seconds of the teacher's pseudo-labelling pass per way, and its labels' agreement with fp32's."""
    from compress import training
    from students import distill
    from teachers import loading

    teacher, tok = loading.load(teacher_dir, cfg.teacher, "teacher")
    kept = len(cfg.student.keep_layers) if isinstance(cfg.student.keep_layers, list) else 10
    layers = list(range(1, min(kept, teacher.config.num_hidden_layers) + 1))  # as many states as its student reads

    def labels(batch: int, autocast: bool, weights: torch.dtype | None) -> tuple[list[str], float]:
        cfg.distill.pseudo_batch_size = batch
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), training.cast_weights(teacher, weights):
            answers = distill.teacher_answers(teacher, tok, splits.unlabeled, splits, cfg, 32, layers)[0]
        return answers, time.perf_counter() - t0

    ways = {"autocast, batch 8": (8, True, None), "autocast, batch 32": (32, True, None),
            "bf16 weights, batch 32": (32, False, torch.bfloat16)}
    fp32, _ = labels(32, False, None)
    out = {name: {"s": [], "labels_equal_fp32": None} for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            answers, s = labels(*way)
            out[name]["s"].append(s)
            out[name]["labels_equal_fp32"] = sum(a == b for a, b in zip(answers, fp32))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--examples", type=int, default=200, help="eval examples scored per graph")
    p.add_argument("--reviews", type=int, default=400, help="unlabeled examples in the teacher's pass")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_cost.json")
    args = p.parse_args()
    from rich.console import Console
    from rich.table import Table

    from compress.cli import _quiet
    from compress.config import load_config
    from compress.data import load_splits
    from compress.results import hardware

    _quiet()
    cfg = load_config(args.overrides)
    splits = load_splits(cfg.data)
    splits.eval, splits.unlabeled = splits.eval[: args.examples], splits.unlabeled[: args.reviews]
    export_dir = next(d for d in sorted(args.run.glob("*_export")) if (d / "DONE").exists())
    load_start, t0 = list(os.getloadavg()), time.perf_counter()
    scoring = score_times(export_dir, cfg, splits, args.rounds)
    passes = pass_times(args.run / "01_finetune_teacher" / "model", cfg, splits, args.rounds)

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    table = Table(title=f"ONNX scoring of {len(splits.eval)} eval examples ({args.rounds} rounds alternated)")
    for col in ("folder", "full s", "gathered s", "full / gathered", "accuracy full, gathered"):
        table.add_column(col, justify="right")
    for name, r in scoring.items():
        r["speedup"] = mean(r["full_s"]) / mean(r["gathered_s"])
        table.add_row(name, f"{mean(r['full_s']):.1f}", f"{mean(r['gathered_s']):.1f}", f"{r['speedup']:.2f}x",
                      f"{r['accuracy']['full']:.3f}, {r['accuracy']['gathered']:.3f}")
    Console(width=140).print(table)
    table = Table(title=f"pseudo-labelling pass over {len(splits.unlabeled)} reviews (top-32 and hidden states)")
    for col in ("way", "s", "x autocast batch 8", "labels = fp32"):
        table.add_column(col, justify="right")
    base = mean(passes["autocast, batch 8"]["s"])
    for name, r in passes.items():
        r["speedup"] = base / mean(r["s"])
        table.add_row(name, f"{mean(r['s']):.1f}", f"{r['speedup']:.2f}x", f"{r['labels_equal_fp32']} / {len(splits.unlabeled)}")
    Console(width=140).print(table)
    result = {"run": str(args.run), "overrides": args.overrides, "hardware": hardware(),
              "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
              "wall_s": time.perf_counter() - t0, "scoring": scoring, "pseudo_label_pass": passes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
