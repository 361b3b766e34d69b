"""Is compress's student faster than what a user would run instead, and how much accuracy did it keep?

In one process, one after another, with the same data, prompt and decode length:
  teacher fp32        the base teacher in PyTorch (the accuracy reference)
  student fp32        the student in plain PyTorch (the speed reference)
  student bf16        the same weights cast to bfloat16
  student int8        torch.ao dynamic int8 quantization of every Linear but lm_head
  student <export>    every exported artifact of the run (folders with model.onnx), through
                      `compress.backends.open_backend`: rows light up when that backend lands
  teacher GGUF        the teacher's own Q4_1 GGUF on llama.cpp (llama-cpp-python, optional extra
                      `compress[llamacpp]`), scored through its logits like every other row

    python benchmarks/baselines.py                               # default job's student
    python benchmarks/baselines.py --run runs/exp1 data.eval_size=200
    python benchmarks/baselines.py --student runs/exp1/02_distill teacher=tiny-random ...

OVERRIDEs are `compress run` overrides (data, eval settings, teacher). The student is --student,
else the run's last student, else the default student built from the teacher. Writes
benchmarks/results/baselines.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def student_path(args, cfg, teacher_dir: Path) -> Path:
    if args.student:
        return args.student
    if args.run:  # the student role of the run's last finished stage: a PyTorch folder, never an ONNX one
        from compress.artifact import Artifact

        stages = [d for d in sorted(args.run.glob("[0-9][0-9]_*")) if (d / "DONE").exists()]
        student = Artifact.load(stages[-1]).student() if stages else None
        if student is not None:
            return Path(student["path"])
    from students import build

    return build.resolve(cfg.student, teacher_dir)


def int8_dynamic(model):
    """torch.ao dynamic int8 (per-tensor weights, activations quantized on the fly) of every Linear
    except the output head, which costs the most accuracy."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantization: deprecated, still works
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        spec = {name: default_dynamic_qconfig for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name != "lm_head"}
        return quantize_dynamic(model, spec, dtype=torch.qint8)


def measure(backend, splits, cfg, prompt: list[int]) -> dict:
    from compress.evaluate import score_accuracy

    row = {"variant": backend.name, "path": str(backend.path), "size_mb": backend.size_mb}
    if cfg.eval.accuracy and splits.labelled and backend.logits_fn and backend.tokenizer is not None:
        row["accuracy"] = score_accuracy(backend.logits_fn, backend.tokenizer, splits, cfg.data, cfg.eval.batch_size,
                                         f"{backend.name}: accuracy")["accuracy"]
    row.update(backend.latency(prompt, cfg.eval.decode_tokens, cfg.eval.warmup_runs, cfg.eval.latency_runs))
    return row


def variants(args, cfg, teacher_dir: Path, student_dir: Path):
    """(name, thunk) pairs; each thunk opens one backend, so only one model variant is alive at a time."""
    from compress.backends import open_backend, torch_backend, torch_folder
    from teachers import loading

    def cast(dtype, name):
        def open_():
            b = torch_folder(student_dir)
            return torch_backend(b.extra["model"].to(dtype), b.tokenizer, student_dir, name)
        return open_

    def int8():
        b = torch_folder(student_dir)
        return torch_backend(int8_dynamic(b.extra["model"]), b.tokenizer, student_dir, "student int8 dynamic")

    def gguf_teacher():
        from compress.backends import llamacpp_backend

        gguf = args.gguf or loading.bundled_gguf(cfg.teacher, "teacher")
        tok = loading.load_tokenizer(teacher_dir, cfg.teacher, "teacher")
        b = llamacpp_backend(Path(gguf), args.threads, logits_all=True, tokenizer=tok)
        b.name = f"teacher {Path(gguf).name} llama.cpp"
        return b

    out = [("teacher fp32", lambda: _named(torch_folder(teacher_dir), "teacher fp32")),
           ("student fp32", lambda: _named(torch_folder(student_dir), "student fp32")),
           ("student bf16", cast(torch.bfloat16, "student bf16")), ("student int8 dynamic", int8)]
    if args.run:
        for onnx in sorted({p.parent for p in args.run.rglob("*.onnx")}):
            name = f"student onnx {onnx.relative_to(args.run)}"
            out.append((name, lambda o=onnx, n=name: _named(open_backend(o, args.threads), n)))
    if args.gguf or cfg.teacher.gguf_package:
        out.append(("teacher GGUF llama.cpp", gguf_teacher))
    return out


def _named(backend, name: str):
    backend.name = name
    return backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a run folder: its last student and its exported artifacts")
    p.add_argument("--student", type=Path, help="a student model folder or stage folder (overrides --run's)")
    p.add_argument("--gguf", type=Path, help="GGUF for the llama.cpp row (default: the teacher preset's bundled one)")
    p.add_argument("--threads", type=int, help="torch and llama.cpp threads")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "baselines.json")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from rich.markup import escape

    from compress.backends import model_path
    from compress.cli import _quiet
    from compress.config import load_config
    from compress.console import out, say
    from compress.data import load_splits
    from compress.errors import CompressError
    from compress.results import hardware
    from teachers import loading

    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.overrides)
    splits = load_splits(cfg.data)
    teacher_dir = loading.resolve(cfg.teacher, "teacher")
    student_dir = model_path(student_path(args, cfg, teacher_dir))
    say(f"student: {student_dir}\nteacher: {teacher_dir}\ndata: {cfg.data.name} {splits.sizes()}")
    tok = loading.load_tokenizer(teacher_dir, cfg.teacher, "teacher")
    stream = tok(" ".join(e.text for e in splits.eval[:50]), add_special_tokens=False)["input_ids"]
    prompt = (stream * (cfg.eval.prefill_tokens // max(1, len(stream)) + 1))[: cfg.eval.prefill_tokens]
    rows = []
    for name, open_ in variants(args, cfg, teacher_dir, student_dir):
        say(f"▶ {name}")
        try:
            backend = open_()
        except CompressError as e:  # a backend that is not installed or not there yet: say why, keep going
            rows.append({"variant": name, "skipped": e.render()})
            say(escape(f"  skipped: {e.render()}"))
            continue
        rows.append(measure(backend, splits, cfg, prompt))
        del backend
    relate(rows)
    out.print(table(rows))
    for r in rows:
        if "skipped" in r:
            say(escape(f"{r['variant']} skipped: {r['skipped']}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": hardware(), "student": str(student_dir), "teacher": str(teacher_dir),
                                    "data": cfg.data.name, "eval_examples": len(splits.eval),
                                    "decode_tokens": cfg.eval.decode_tokens, "rows": rows}, indent=2))
    say(f"wrote {args.out}")


def relate(rows: list[dict]) -> None:
    """Ratios: accuracy over the fp32 teacher's, decode tok/s over the fp32 student's."""
    by = {r["variant"]: r for r in rows}
    teacher, student = by.get("teacher fp32", {}), by.get("student fp32", {})
    for r in rows:
        if r.get("accuracy") is not None and teacher.get("accuracy"):
            r["retention"] = r["accuracy"] / teacher["accuracy"]
        if r.get("decode_tok_s") and student.get("decode_tok_s"):
            r["speed_vs_student_fp32"] = r["decode_tok_s"] / student["decode_tok_s"]


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="baselines: same data, prompt and decode length, one process")
    for col in ("variant", "accuracy", "retention vs teacher fp32", "decode tok/s", "x student fp32", "prefill ms",
                "size MB"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        if "skipped" in r:
            t.add_row(r["variant"], "skipped", "", "", "", "", "")
            continue
        t.add_row(r["variant"], fmt(r.get("accuracy"), "{:.3f}"), fmt(r.get("retention"), "{:.3f}"),
                  fmt(r["decode_tok_s"], "{:.1f}"), fmt(r.get("speed_vs_student_fp32"), "{:.2f}x"),
                  fmt(r["prefill_ms"], "{:.1f}"), fmt(r["size_mb"], "{:.1f}"))
    return t


if __name__ == "__main__":
    main()
