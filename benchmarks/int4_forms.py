"""Which low-bit form of an exported student keeps its accuracy, and at what decode speed?

Reads a finished `export` stage folder (its fp32 graph `onnx/`, and `teacher-onnx-int8/` for the ratio)
and writes, beside it in --work, the student's weights in these forms, each scored on the task's eval
split (accuracy, paired difference to fp32 with its 95% bootstrap interval, compress.stats) and timed (batch-1 greedy decode, the
export stage's loop, rounds interleaved):

  int4          what `export` writes (its own function and `export` settings): MatMulNBits, 4 bits,
                symmetric round-to-nearest, blocks of 32
  int4-asym     the same with a zero point per block
  int4-hqq      half-quadratic quantization (onnxruntime's HQQ config): scales fitted to each block
  int8-nbits    MatMulNBits with 8 bits (same kernel family, every MatMul)
  mixed-K       int4, but the K decoder layers most sensitive to int4 in 8 bits (per-layer sensitivity:
                KL(fp32 || that layer alone in int4) at the answer position of 128 `unlabeled` prompts,
                never the eval split)

    python benchmarks/int4_forms.py runs/NAME/03_export --mixed 1 3 [OVERRIDE...]

Overrides are those the run was made with (they pick the task). Writes benchmarks/results/int4_forms.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch

MATMUL = "MatMul"


def quantize(src: Path, dest: Path, plan: list[tuple[int, set[str]]], symmetric: bool = True,
             hqq: bool = False) -> None:
    """`src/model.onnx` with each (bits, MatMul names) of `plan` applied in turn; files beside it copied."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(src / "model.onnx")
    for bits, names in plan:
        every = [n.name for n in model.graph.node if n.op_type == MATMUL]
        algo = HQQWeightOnlyQuantConfig(block_size=32, bits=bits) if hqq else None
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=symmetric, accuracy_level=4,
                                 nodes_to_exclude=[n for n in every if n not in names], algo_config=algo)
        q.process()
        model = q.model.model
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    onnx.save(model, dest / "model.onnx")
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, dest / f.name)


def layer_of(name: str) -> str | None:
    """'/model/layers.3/mlp/up_proj/MatMul' -> 'layers.3'; the head -> None."""
    m = re.search(r"/(layers\.\d+)/", name)
    return m.group(1) if m else None


def answer_logprobs(folder: Path, tok, prompts: list[list[int]]) -> torch.Tensor:
    """Log-probs of the next token after each prompt: (N, V)."""
    from compress import ort
    from compress.evaluate import pad

    fn, out = ort.logits_fn(ort.OnnxLM.open(folder, torch.get_num_threads())), []
    for s in range(0, len(prompts), 8):
        batch = prompts[s: s + 8]
        ids, mask = pad(batch, tok.pad_token_id)
        last = sorted({len(p) - 1 for p in batch})
        logits = fn(ids, mask, last)  # (B, K, V)
        out += [torch.log_softmax(logits[i, last.index(len(p) - 1)].float(), -1) for i, p in enumerate(batch)]
    return torch.stack(out)


def sensitivity(src: Path, work: Path, tok, prompts, names: list[str]) -> dict[str, float]:
    """Per decoder layer: mean KL(fp32 || that layer's MatMuls alone in int4) on `prompts`."""
    ref, out = answer_logprobs(src, tok, prompts), {}
    for layer in sorted({layer_of(n) for n in names} - {None}, key=lambda s: int(s.split(".")[1])):
        probe = work / "probe"
        quantize(src, probe, [(4, {n for n in names if layer_of(n) == layer})])
        lp = answer_logprobs(probe, tok, prompts)
        out[layer] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    shutil.rmtree(work / "probe", ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", type=Path)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--mixed", nargs="*", type=int, default=[1, 3], help="K of each mixed-K form")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    p.add_argument("--work", type=Path, help="where the forms are written (default: EXPORT_DIR/int4_forms)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_forms.json"))
    args = p.parse_args()
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    import onnx
    from compress import ort, stats
    from compress.cli import _quiet
    from compress.config import load_config
    from compress.data import load_splits
    from compress.evaluate import build_prompt, score_accuracy
    from compress.results import hardware
    from compress.stages import export

    _quiet()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per MatMul otherwise
    cfg = load_config(args.overrides)
    splits, src, work = load_splits(cfg.data), args.export_dir / "onnx", args.work or args.export_dir / "int4_forms"
    tok = AutoTokenizer.from_pretrained(src)
    names = [n.name for n in onnx.load(src / "model.onnx", load_external_data=False).graph.node if n.op_type == MATMUL]
    every = set(names)
    t0, load_start = time.perf_counter(), list(os.getloadavg())
    prompts = [tok(build_prompt(tok, e.text, cfg.data))["input_ids"] for e in splits.unlabeled[:128]]
    sens = sensitivity(src, work, tok, prompts, names)
    ranked = sorted(sens, key=sens.get, reverse=True)
    forms = {"fp32": src}
    export.quantize("int4", src, work / "int4", cfg.export); forms["int4"] = work / "int4"
    quantize(src, work / "int4-asym", [(4, every)], symmetric=False); forms["int4-asym"] = work / "int4-asym"
    quantize(src, work / "int4-hqq", [(4, every)], hqq=True); forms["int4-hqq"] = work / "int4-hqq"
    quantize(src, work / "int8-nbits", [(8, every)]); forms["int8-nbits"] = work / "int8-nbits"
    for k in args.mixed:
        eight = {n for n in names if layer_of(n) in ranked[:k]}
        quantize(src, work / f"mixed-{k}", [(8, eight), (4, every - eight)])
        forms[f"mixed-{k}"] = work / f"mixed-{k}"
    rows = {}
    for name, folder in forms.items():
        lm = ort.OnnxLM.open(folder, torch.get_num_threads())
        r = score_accuracy(ort.logits_fn(lm), tok, splits, cfg.data, cfg.eval.batch_size, desc=name)
        rows[name] = {"accuracy": r["accuracy"], "per_example": r["per_example"]["accuracy"],
                      "size_mb": sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20}
    teacher = args.export_dir / "teacher-onnx-int8"
    timed = {**forms, "teacher-int8": teacher} if teacher.is_dir() else dict(forms)
    prompt = tok(" ".join(e.text for e in splits.eval[:20]))["input_ids"][: cfg.eval.prefill_tokens]
    speeds = {k: [] for k in timed}
    for _ in range(args.rounds):
        for name, folder in timed.items():
            lm = ort.OnnxLM.open(folder, torch.get_num_threads())
            speeds[name].append(ort.measure_latency(lm, prompt, cfg.eval.decode_tokens, 1, 5)["decode_tok_s"])
    base = rows["fp32"]["per_example"]
    t_int8 = sum(speeds["teacher-int8"]) / len(speeds["teacher-int8"]) if "teacher-int8" in speeds else None
    table = Table(title=f"{args.export_dir}: low-bit forms of the student ({len(base)} eval examples, "
                        f"{args.rounds} interleaved timing rounds, load {os.getloadavg()[0]:.2f})")
    for col in ("form", "accuracy", "- fp32 [95% CI]", "decode tok/s", "x int8 teacher", "MB"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        drop, (low, high) = stats.drop_ci(base, r["per_example"])  # paired bootstrap, as the report's
        diff = (0.0 - drop, 0.0 - high, 0.0 - low)  # 0.0 - x: no "-0.000" for an equal form
        tok_s = sum(speeds[name]) / len(speeds[name])
        r.update(minus_fp32=diff, decode_tok_s=speeds[name], vs_teacher_int8=tok_s / t_int8 if t_int8 else None)
        table.add_row(name, f"{r['accuracy']:.3f}", f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]",
                      f"{tok_s:.1f}", f"{tok_s / t_int8:.2f}x" if t_int8 else "", f"{r['size_mb']:.0f}")
    if t_int8:
        table.add_row("teacher int8 (dynamic)", "", "", f"{t_int8:.1f}", "1x", "")
    Console(width=140).print(table)
    print("int4 sensitivity by layer (KL at the answer):", ", ".join(f"{k} {v:.2e}" for k, v in sens.items()))
    result = {"export_dir": str(args.export_dir), "overrides": args.overrides, "hardware": hardware(),
              "load_average_start": load_start, "load_average_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t0,
              "sensitivity": sens, "ranked": ranked, "teacher_int8_tok_s": speeds.get("teacher-int8"),
              "forms": {k: {kk: vv for kk, vv in v.items() if kk != "per_example"} for k, v in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
