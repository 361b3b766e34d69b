"""How fast can a student cut from the teacher decode, as a function of how many layers it keeps?

For each depth N it cuts the teacher's first N layers (embeddings, norm and head copied, as
`smollm2-slim` does; weights do not change the speed of a dense model), exports it to ONNX and
quantizes it like the export stage (`export.*` settings), then measures batch-1 greedy decode
tok/s of every model and the int8 teacher, interleaved over `--rounds` rounds in one process
(medians), as ratios to the teacher's same form measured beside it.

Decode time per token is then fitted as t(N) = a + b N by least squares: b is one layer's cost,
a everything else (the head over the vocabulary, embeddings, the runtime's fixed cost), printed in
layer-equivalents a / b. The fit gives the speed-up a depth can reach, its ceiling as N -> 0
(t(teacher) / a), and the depth needed for a target speed-up (`--target`, default 4.5x).

    python benchmarks/depth_speed.py                            # depths 2,4,6,8,10, int8
    python benchmarks/depth_speed.py --depths 3,6,10 --forms int8,int4 --rounds 5
    python benchmarks/depth_speed.py --forms fp32,int8,int4 export.int4_exclude=[]   # int4 head too

Writes benchmarks/results/depth_speed.json with the load average at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(teacher_dir: Path, depths: list[int], forms: list[str], e, work: Path) -> dict[str, Path]:
    """{name: ONNX folder}: the teacher and each depth, in every form."""
    from compress.console import say
    from compress.stages.export import export_onnx, quantize
    from students.build import derive_from_teacher

    sources = {"teacher": teacher_dir, **{f"L{n}": derive_from_teacher(teacher_dir, list(range(n))) for n in depths}}
    folders = {}
    for name, src in sources.items():
        say(f"exporting {name} ...")
        fp32 = work / name / "fp32"
        export_onnx(src, fp32)
        for form in forms:
            if form == "fp32":
                folders[f"{name} {form}"] = fp32
                continue
            dest = work / name / form
            quantize(form, fp32, dest, e)
            folders[f"{name} {form}"] = dest
    return folders


def measure(folders: dict[str, Path], rounds: int, prompt: int, decode: int, threads: int | None) -> dict[str, list]:
    """Decode tok/s of each folder, `rounds` times, round-robin (so drifting load hits all alike)."""
    from compress.backends import open_backend

    backends = {name: open_backend(path, threads) for name, path in folders.items()}
    vocab = min(b.vocab_size for b in backends.values())
    ids = [(1000 + i) % vocab for i in range(prompt)]  # any tokens: a dense model's speed does not read them
    speeds = {name: [] for name in folders}
    for r in range(rounds):
        for name, b in backends.items():
            speeds[name].append(b.latency(ids, decode, 1 if r == 0 else 0, 3)["decode_tok_s"])
    return speeds


def fit(depths: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of seconds per token = a + b * depth."""
    b, a = statistics.linear_regression(depths, seconds)
    return a, b


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="compress run overrides (teacher=..., export.int8_exclude=...)")
    p.add_argument("--depths", default="2,4,6,8,10", help="numbers of the teacher's first layers to keep")
    p.add_argument("--forms", default="int8", help="fp32, int8, int4 (comma-separated)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--target", type=float, default=4.5, help="speed-up over the teacher's same form to solve for")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "depth_speed.json")
    args = p.parse_intermixed_args()
    sys.path.insert(0, str(ROOT))
    from rich.table import Table

    from compress.cli import _quiet
    from compress.config import load_config
    from compress.console import out, say
    from compress.results import hardware
    from teachers import loading

    _quiet()
    load_start = os.getloadavg()
    cfg = load_config(args.overrides)
    depths, forms = [int(d) for d in args.depths.split(",")], args.forms.split(",")
    teacher_dir = loading.resolve(cfg.teacher, "teacher")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="depth_speed-") as tmp:
        folders = build(teacher_dir, depths, forms, cfg.export, Path(tmp))
        say(f"measuring decode, {args.rounds} rounds ...")
        speeds = measure(folders, args.rounds, args.prompt_tokens, args.decode_tokens, args.threads)
    layers = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    result = {"hardware": hardware(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "teacher": str(teacher_dir), "teacher_layers": layers, "overrides": args.overrides,
              "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "rounds": args.rounds,
              "wall_s": time.perf_counter() - t0, "forms": {}}
    for form in forms:
        tok_s = {n: statistics.median(speeds[f"L{n} {form}"]) for n in depths}
        teacher = statistics.median(speeds[f"teacher {form}"])
        a, b = fit(depths + [layers], [1 / tok_s[n] for n in depths] + [1 / teacher])
        need = (1 / teacher / args.target - a) / b  # depth whose fitted time is the teacher's / target
        result["forms"][form] = {
            "teacher_tok_s": teacher, "teacher_runs": speeds[f"teacher {form}"],
            "depths": {n: {"tok_s": tok_s[n], "runs": speeds[f"L{n} {form}"], "speedup": tok_s[n] / teacher}
                       for n in depths},
            "fixed_s_per_token": a, "layer_s_per_token": b, "fixed_in_layers": a / b,
            "ceiling_speedup": (1 / teacher) / a if a > 0 else None, "depth_for_target": need}
        t = Table(title=f"{form}: decode tok/s by depth (teacher {layers} layers, {teacher:.1f} tok/s; load "
                        f"{load_start[0]:.1f} -> {result['load_average_end'][0]:.1f})")
        int8 = statistics.median(speeds["teacher int8"]) if "int8" in forms and form != "int8" else None
        for col in ("layers", "tok/s (median)", "per round", f"x teacher {form}", *(["x teacher int8"] if int8 else [])):
            t.add_column(col, justify="right")
        for n in depths:
            t.add_row(str(n), f"{tok_s[n]:.1f}", ", ".join(f"{s:.0f}" for s in speeds[f"L{n} {form}"]),
                      f"{tok_s[n] / teacher:.2f}", *([f"{tok_s[n] / int8:.2f}"] if int8 else []))
            if int8 is not None:
                result["forms"][form]["depths"][n]["speedup_vs_teacher_int8"] = tok_s[n] / int8
        out.print(t)
        ceiling = result["forms"][form]["ceiling_speedup"]
        say(f"{form}: t(N) = {a * 1e3:.2f} ms + N x {b * 1e3:.2f} ms per token: the part that does not shrink with "
            f"depth is {a / b:.1f} layers' worth; ceiling as N -> 0: "
            f"{'n/a' if ceiling is None else f'{ceiling:.1f}x'}; {args.target}x needs N <= {need:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
