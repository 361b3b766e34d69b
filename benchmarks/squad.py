"""The full pipeline on a generative task: SQuAD v1.1 dev questions answered by SmolLM2-135M-Instruct
(zero-shot and fine-tuned), its 10-layer student (distilled on the teacher's own answers), pruned and
recovered, GPTQ 4-bit and ONNX int8: exact match and F1 of each, retention of F1, decode speed.

    python benchmarks/squad.py                          # the preset below (about 20 min on 2 cores)
    python benchmarks/squad.py data.eval_size=100       # any `compress run` override on top

Paragraphs are split between train, unlabeled and eval (no context is both trained on and evaluated).
Writes benchmarks/results/squad.json (hardware and load average, overrides, wall time, results.json)
and prints the table below. Speed figures mean something only on a quiet machine (load < 1.5).
"""
from __future__ import annotations


from pipeline_tradeoff import ROOT, arguments, run_and_record

SQUAD = ROOT.parent / "shared" / "data" / "squad" / "squad_dev_v1.1.json"
PRESET = ["data=squad", f"data.path={SQUAD}", "data.eval_size=150", "data.train_size=240",
          "data.unlabeled_size=320", "data.max_chars=700", "finetune.max_steps=40", "distill.max_steps=80",
          "prune.recovery_steps=20"]
"""Sized for about 20 minutes on 2 CPU cores (the default job's step counts would take hours here: SQuAD
prompts, passages cut to 700 characters, are about 3x longer than reviews). Questions whose answer the
cut removed are dropped."""


def rows(result: dict) -> list[dict]:
    """One row per model the issue asks about: (label, record) in pipeline order."""
    out = []
    for r in result["records"]:
        what = {("evaluate", "teacher"): "teacher, zero-shot", ("evaluate", "student"): "student, cut (no training)",
                ("finetune_teacher", "teacher"): "teacher, fine-tuned", ("distill", "student"): "student, distilled"}
        label = what.get((r["stage"], r["role"])) or f"{r['role']}{' baseline' if r.get('baseline') else ''}, " \
                                                      f"{r.get('variant') or r['stage']}"
        out.append({"model": label, "backend": r.get("backend"), "exact_match": r.get("exact_match"),
                    "f1": r.get("f1"), "retention_f1": r.get("retention"), "perplexity_ratio": r.get("perplexity_ratio"),
                    "decode_tok_s": r.get("decode_tok_s"), "speedup": r.get("speedup")})
    return out


def main() -> None:
    from compress.console import out
    from rich.table import Table

    args = arguments(__doc__, "squad")
    result = run_and_record([*PRESET, *args.overrides], args.out, "squad")
    t = Table(title=f"SQuAD v1.1 dev ({len(result['records'])} records, load average "
                    f"{result['hardware']['load_average'][0]:.2f} -> {result['load_average_end'][0]:.2f})")
    for col in ("model", "backend", "EM", "F1", "F1 retention", "ppl ratio", "decode tok/s", "speed-up"):
        t.add_column(col, justify="left" if col in ("model", "backend") else "right")
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows(result):
        t.add_row(r["model"], r["backend"], fmt(r["exact_match"], ".3f"), fmt(r["f1"], ".3f"),
                  fmt(r["retention_f1"], ".3f"), fmt(r["perplexity_ratio"], ".3g"), fmt(r["decode_tok_s"], ".1f"),
                  fmt(r["speedup"], ".2f"))
    out.print(t)


if __name__ == "__main__":
    main()
