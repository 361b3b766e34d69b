"""How much faster does the student decode through onnxruntime than in PyTorch, and at what cost?

One process, one model (default: the `smollm2-slim` student, 10 of SmolLM2-135M's 30 layers),
the same threads everywhere. It exports the model with the `export` stage's own functions
(fp32, int8 with the default exclusions, int8 of every MatMul, int4 MatMulNBits), then measures
batch-1 greedy decoding, interleaved in rounds so that load from other processes hits every
backend alike:

  torch          PyTorch fp32, the evaluator's KV-cache loop (compress.evaluate.measure_latency)
  ort-iob        the raw InferenceSession loop with IO binding and preallocated KV buffers
                 (compress.ort: what the `export` stage reports)
  optimum        ORTModelForCausalLM.generate on the same ONNX file
  genai          onnxruntime-genai's C++ loop on its model builder's graph, if the package is
                 installed (its int4 and fp32 builds)

and per ONNX variant: size, perplexity on held-out text and top-1 agreement with PyTorch.

    python benchmarks/onnx_decode.py                      # the real student
    python benchmarks/onnx_decode.py student=tiny-random teacher=tiny-random --rounds 2

Writes benchmarks/results/onnx_decode.json; speeds are ratios to torch from the same run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (variant, export settings)
    "fp32": ("fp32", {}),
    "int8": ("int8", {}),  # the default: down_proj kept fp32
    "int8-fp32-head": ("int8", {"int8_exclude": ["down_proj", "lm_head"]}),
    "int8-all": ("int8", {"int8_exclude": []}),
    "int4": ("int4", {}),  # the default: lm_head kept fp32
}


def export_all(model_dir: Path, work: Path, cfg) -> dict[str, Path]:
    from compress.stages import export

    folders = {"fp32": work / "fp32"}
    if not (folders["fp32"] / "model.onnx").exists():
        t0 = time.perf_counter()
        export.export_onnx(model_dir, folders["fp32"])
        print(f"export: {time.perf_counter() - t0:.1f} s")
    for name, (variant, over) in VARIANTS.items():
        if variant == "fp32":
            continue
        folders[name] = work / name
        if not (folders[name] / "model.onnx").exists():
            shutil.rmtree(folders[name], ignore_errors=True)
            e = SimpleNamespace(**{**dict(cfg.export), **over})
            t0 = time.perf_counter()
            export.quantize(variant, folders["fp32"], folders[name], e)
            print(f"{name}: {time.perf_counter() - t0:.1f} s")
    return folders


def build_genai(model_dir: Path, work: Path, threads: int) -> dict[str, Path]:
    """onnxruntime-genai's model builder (int4 and fp32 CPU graphs), when the package is installed."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return {}
    out = {}
    for precision in ("int4", "fp32"):
        dest = work / f"genai-{precision}"
        if not (dest / "genai_config.json").exists():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o",
                            str(dest), "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                           capture_output=True)
        conf = json.loads((dest / "genai_config.json").read_text())
        conf["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        (dest / "genai_config.json").write_text(json.dumps(conf, indent=2))
        out[f"genai-{precision}"] = dest
    return out


def genai_decode(folder: Path, prompt: list[int], tokens: int):
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def once() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + tokens + 1, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens([prompt])  # prefill; it also yields the first token
        t0 = time.perf_counter()
        for _ in range(tokens):
            gen.generate_next_token()
        return tokens / (time.perf_counter() - t0)

    return once


def optimum_decode(folder: Path, prompt: list[int], tokens: int, threads: int):
    """Decode tok/s through ORTModelForCausalLM.generate: (time(1 + N new) - time(1 new)) / N."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(folder, session_options=opts, use_io_binding=True)
    ids = torch.tensor([prompt])

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        return time.perf_counter() - t0

    return lambda: tokens / max(gen(tokens + 1) - gen(1), 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="compress overrides (student=..., teacher=...)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "onnx_decode"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median)")
    ap.add_argument("--ppl-blocks", type=int, default=8)
    ap.add_argument("--lean-only", action="store_true", help="time torch and the lean loop only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_decode.json"))
    args = ap.parse_args()

    import torch

    from compress import ort
    from compress.config import load_config
    from compress.data import load_splits
    from compress.evaluate import (measure_latency, perplexity, perplexity_blocks, torch_logits_fn,
                                   weights_size_mb)
    from compress.stages import export
    from students import build as student_build
    from teachers import loading

    torch.set_num_threads(args.threads)
    cfg = load_config(args.overrides)
    model_dir = student_build.resolve(cfg.student, loading.resolve(cfg.teacher, "teacher"))
    work = Path(args.work)
    folders = export_all(model_dir, work, cfg)
    genai = {} if args.lean_only else build_genai(model_dir, work, args.threads)
    model, tok = loading.load(model_dir, export._cpu(cfg.student), "student")
    splits = load_splits(cfg.data)
    blocks = perplexity_blocks(tok, splits.perplexity, args.ppl_blocks, 128)
    prompt = (sum(blocks, []) * 4)[: args.prompt]

    rows = {"torch": {"size_mb": weights_size_mb(model_dir),
                      "perplexity": perplexity(torch_logits_fn(model), blocks, 4, tok.pad_token_id, "torch ppl")}}
    timers = {"torch": lambda: measure_latency(model, prompt, args.tokens, 0, 1)["decode_tok_s"]}
    for name, folder in folders.items():
        lm = ort.OnnxLM.open(folder, args.threads)
        fn = ort.logits_fn(lm)
        rows[name] = {"size_mb": weights_size_mb(folder),
                      "perplexity": perplexity(fn, blocks, 4, tok.pad_token_id, f"{name} ppl"),
                      **export.compare(torch_logits_fn(model), fn, blocks[:4], tok.pad_token_id)}
        timers[f"{name} ort-iob"] = (lambda lm=lm: ort.measure_latency(lm, prompt, args.tokens, 0, 1)["decode_tok_s"])
        if not args.lean_only:
            timers[f"{name} optimum"] = optimum_decode(folder, prompt, args.tokens, args.threads)
    for name, folder in genai.items():
        rows[name] = {"size_mb": sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20}
        timers[name] = genai_decode(folder, prompt, args.tokens)

    for timer in timers.values():  # warm-up
        timer()
    speeds: dict[str, list[float]] = {k: [] for k in timers}
    for r in range(args.rounds):
        for key, timer in timers.items():
            speeds[key].append(timer())
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()))
    base = statistics.median(speeds["torch"])
    decode = {k: {"decode_tok_s": statistics.median(v), "vs_torch": statistics.median(v) / base, "runs": v}
              for k, v in speeds.items()}

    print(f"\n{'backend':<20}{'decode tok/s':>14}{'x torch':>9}")
    for k, v in decode.items():
        print(f"{k:<20}{v['decode_tok_s']:>14.1f}{v['vs_torch']:>9.2f}")
    print(f"\n{'model':<12}{'size MB':>9}{'ppl':>9}{'top-1':>8}{'max|diff|':>11}")
    for k, v in rows.items():
        print(f"{k:<12}{v['size_mb']:>9.1f}{v.get('perplexity', float('nan')):>9.2f}"
              f"{v.get('top1', float('nan')):>8.4f}{v.get('max_abs_diff', float('nan')):>11.3g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from compress.results import hardware

    Path(args.out).write_text(json.dumps({"hardware": hardware(),
        "model": str(model_dir), "threads": args.threads, "prompt_tokens": args.prompt, "new_tokens": args.tokens,
        "rounds": args.rounds, "decode": decode, "models": rows,
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), None)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
