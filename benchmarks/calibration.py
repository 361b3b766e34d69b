"""CPU settings per model: what the load-time calibration (compress/calibrate.py) chooses, against
torch's defaults (all of torch's threads, SDPA attention, fp32), for the real SmolLM2-135M and for
random weights at Qwen2.5-0.5B's real shape (vocabulary included).

    python benchmarks/calibration.py [--dtypes float32,bfloat16] [--models smollm2,qwen2.5-0.5b-random]

For each model: the calibration runs from an empty cache (its time is reported), then the default and
the chosen settings are timed alternately (prefill of 128 tokens and batch-1 greedy decode of 64,
medians of 5 after a warm-up; compress.evaluate.measure_latency), so the ratio is from one run.
Writes benchmarks/results/calibration.json with the hardware and the load average.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True)


def smollm2() -> Path:
    from compress.config import load_config
    from teachers import loading

    return loading.resolve(load_config([]).teacher, "teacher")


def tiny_random() -> Path:
    from compress.config import load_config
    from teachers import loading

    return loading.resolve(load_config(["teacher=tiny-random"]).teacher, "teacher")


def qwen_random(tmp: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **QWEN_05B)).save_pretrained(tmp)
    from teachers.loading import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp)  # loading wants one; timing feeds token ids directly
    return tmp


def measure(name: str, folder: Path, dtypes: list[str], rounds: int, cache: Path) -> list[dict]:
    import torch
    from omegaconf import OmegaConf

    from compress import calibrate
    from compress.config import load_config
    from compress.evaluate import measure_latency
    from teachers import loading

    cfg = load_config([f"eval.cpu_dtypes=[{','.join(dtypes)}]"])
    model_cfg = OmegaConf.merge(cfg.teacher, {"path": str(folder)})
    model, _ = loading.load(folder, model_cfg, "teacher")
    default = {"threads": torch.get_num_threads(), "attn_implementation": "sdpa", "dtype": "float32"}
    t0 = time.perf_counter()
    chosen = calibrate.calibrate(model, folder, model_cfg, cfg.eval, loading.folder_fingerprint(folder), cache)
    calibration_s = time.perf_counter() - t0
    prompt = [(i * 7919) % (model.config.vocab_size - 1) + 1 for i in range(128)]
    rows = {"default": [], "calibrated": []}
    for _ in range(rounds):  # alternate: drift of a shared machine hits both alike
        for label, setting in (("default", default), ("calibrated", chosen)):
            calibrate.apply(model, setting)
            rows[label].append(measure_latency(model, prompt, 64, 1, 5))
    torch.set_num_threads(default["threads"])
    out = []
    for label, setting in (("default", default), ("calibrated", chosen)):
        best = max(rows[label], key=lambda r: r["decode_tok_s"])
        out.append({"model": name, "setting": label, **{k: setting[k] for k in default},
                    "prefill_ms": min(r["prefill_ms"] for r in rows[label]), "decode_tok_s": best["decode_tok_s"],
                    "calibration_s": calibration_s if label == "calibrated" else None,
                    "timings": chosen.get("timings") if label == "calibrated" else None})
    base, cal = out
    cal["prefill_speedup"] = base["prefill_ms"] / cal["prefill_ms"]
    cal["decode_speedup"] = cal["decode_tok_s"] / base["decode_tok_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="float32", help="candidate dtypes (eval.cpu_dtypes), comma-separated")
    p.add_argument("--models", default="smollm2,qwen2.5-0.5b-random",
                   help="smollm2, qwen2.5-0.5b-random and/or tiny-random (for tests)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from rich.table import Table

    from compress.cli import _quiet
    from compress.console import out
    from compress.results import hardware

    _quiet()
    start = hardware()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = {"smollm2": smollm2, "tiny-random": tiny_random}.get(name, lambda: qwen_random(Path(tmp) / name))()
            cache = Path(tmp) / f"calibration-{name}.json"  # an empty cache: the calibration runs
            rows += measure(name, folder, args.dtypes.split(","), args.rounds, cache)
    t = Table(title=f"calibration vs torch defaults (load {start['load_average'][0]:.2f})")
    for col in ("model", "setting", "threads", "attention", "dtype", "prefill ms", "decode tok/s", "vs default",
                "calibration s"):
        t.add_column(col, justify="left" if col in ("model", "setting", "attention", "dtype") else "right")
    for r in rows:
        t.add_row(r["model"], r["setting"], str(r["threads"]), r["attn_implementation"], r["dtype"],
                  f"{r['prefill_ms']:.1f}", f"{r['decode_tok_s']:.1f}",
                  f"{r['decode_speedup']:.2f}x decode, {r['prefill_speedup']:.2f}x prefill" if "decode_speedup" in r
                  else "", f"{r['calibration_s']:.1f}" if r["calibration_s"] else "")
    out.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": start, "load_average_end": hardware()["load_average"],
                                    "dtypes": args.dtypes.split(","), "rows": rows}, indent=2))
    out.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
