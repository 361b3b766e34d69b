"""Which distillation setting keeps a student that still writes text: `distill.soft_on=answer` (the
default: soft labels on the answer token only) against `distill.soft_on=all` (on every token of the
prompt too), same student, teacher, data and steps. Prints accuracy, perplexity and its ratio to the
teacher's, with a greedy continuation of one held-out sentence by each student.

    python benchmarks/soft_on.py [OVERRIDE...]      # e.g. distill.max_steps=300

Distils from the base teacher (`pipeline.stages=[evaluate,distill]`) to keep it short; every other setting is
the default job's. Writes benchmarks/results/soft_on.json. Accuracy and perplexity do not depend on load.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline_tradeoff import arguments, run_and_record

PRESET = ["pipeline.stages=[evaluate,distill]", "data.eval_size=200", "data.unlabeled_size=1200",
          "distill.max_steps=150", "eval.latency=false"]
SENTENCE = "The film follows a young woman who"


def continuation(folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = tok(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    from rich.table import Table

    from compress.console import out

    args = arguments(__doc__, "soft_on")
    rows = {}
    for soft_on in ("answer", "all"):
        res = run_and_record([*PRESET, f"distill.soft_on={soft_on}", *args.overrides],
                             args.out.with_name(f"soft_on-{soft_on}.json"), f"soft_on-{soft_on}")
        student = next(r for r in res["records"] if r["stage"] == "distill" and r["role"] == "student")
        teacher = next(r for r in res["records"] if r["role"] == "teacher")
        rows[soft_on] = {"accuracy": student["accuracy"], "perplexity": student["perplexity"],
                         "perplexity_ratio": student["perplexity_ratio"], "teacher_perplexity": teacher["perplexity"],
                         "teacher_accuracy": teacher["accuracy"], "wall_s": res["wall_s"],
                         "continuation": continuation(Path(res["run"]) / "01_distill" / "model"),
                         "load_average": res["hardware"]["load_average"]}
    t = Table(title=f"distill.soft_on (teacher perplexity {rows['answer']['teacher_perplexity']:.1f})")
    for col in ("soft_on", "accuracy", "perplexity", "ppl / teacher", f'"{SENTENCE}" ...'):
        t.add_column(col)
    for k, r in rows.items():
        t.add_row(k, f"{r['accuracy']:.3f}", f"{r['perplexity']:.4g}", f"{r['perplexity_ratio']:.3g}",
                  r["continuation"])
    out.print(t)
    args.out.write_text(json.dumps({"overrides": [*PRESET, *args.overrides], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
