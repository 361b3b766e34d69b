"""How close does each model's decode get to this machine's memory-bandwidth limit?

Decoding one token at batch 1 reads every weight the forward touches once, so on a CPU it is
memory-bound: tok/s <= read bandwidth / bytes of weights read per token. This measures the
read bandwidth (summing large arrays, several sizes, best of N; numpy on one thread and torch
on its threads), then for the fp32 teacher and every model of a run prints that ceiling and
the percentage of it the measured decode achieves.

Bytes read per token: every weight tensor except an untied input embedding (a token reads one
row of it); a tied embedding is read whole, as the output head. For ONNX: every initializer
except those only a Gather reads. The KV cache (small at these lengths) is not counted. For a
.gguf file: its size on disk.

    python benchmarks/bandwidth_ceiling.py                   # teacher + the newest run under runs/
    python benchmarks/bandwidth_ceiling.py --run runs/exp1 --sizes-mb 64,256,1024

Decode tok/s comes from the run's results.json; the teacher (and the teacher's own Q4_1 GGUF on
llama.cpp, when llama-cpp-python is installed) are measured here. Writes
benchmarks/results/bandwidth_ceiling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def read_bandwidth(sizes_mb: list[int], repeats: int) -> list[dict]:
    """GB/s reading float32 arrays of each size: numpy sum (1 thread) and torch sum (all threads)."""
    rows = []
    for mb in sizes_mb:
        a = np.ones(mb * 2**20 // 4, dtype=np.float32)
        t = torch.from_numpy(a)
        for name, fn in (("numpy, 1 thread", a.sum), (f"torch, {torch.get_num_threads()} thread(s)", t.sum)):
            fn()  # touch the pages
            best = min(_timed(fn) for _ in range(repeats))
            rows.append({"size_mb": mb, "reader": name, "gb_s": a.nbytes / best / 1e9})
        del a, t
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bytes_per_token(path: Path) -> int:
    """Bytes of weights one decoded token reads (see the module docstring)."""
    if path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").exists()):
        return onnx_bytes_per_token(path if path.is_file() else path / "model.onnx")
    if path.is_file():  # .gguf
        return path.stat().st_size
    sizes = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                sizes[name] = DTYPE_BYTES[info["dtype"]] * int(np.prod(info["shape"], dtype=np.int64))
    embed = [k for k in sizes if k.endswith(("embed_tokens.weight", "wte.weight"))]
    untied = any(k.endswith("lm_head.weight") for k in sizes)
    return sum(sizes.values()) - (sum(sizes[k] for k in embed) if untied else 0)


def onnx_bytes_per_token(onnx_file: Path) -> int:
    """The graph's weights, less those only a Gather reads (an embedding table: one row per token).
    An int8 export keeps the fp32 embedding for the lookup and a separate int8 copy as the head."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = gathered = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += size
        gathered += size if readers.get(t.name) == {"Gather"} else 0
    return total - gathered


def newest_run(root: Path) -> Path | None:
    runs = [p.parent for p in root.glob("*/results.json")]
    return max(runs, key=lambda p: (p / "results.json").stat().st_mtime) if runs else None


def measure(spec: Path, threads: int | None, prompt: int, decode: int, runs: int) -> float:
    from compress.backends import open_backend

    backend = open_backend(spec, threads)
    ids = torch.randint(0, backend.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    return backend.latency(ids, decode, 1, runs)["decode_tok_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a run folder (default: the newest under runs/, if any)")
    p.add_argument("--sizes-mb", default="64,256,1024", help="array sizes for the bandwidth measurement")
    p.add_argument("--repeats", type=int, default=5, help="passes per size; the best is kept")
    p.add_argument("--threads", type=int, help="torch threads for reading and decoding")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="timed decode runs (median) of what is measured here")
    p.add_argument("--measure", action="store_true", help="measure every model's decode here, next to the "
                   "bandwidth, instead of reading the run's results.json (fairer on a busy machine)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bandwidth_ceiling.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from compress.cli import _quiet
    from compress.config import load_config
    from compress.console import out, say
    from compress.results import record_path
    from teachers import loading

    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    say("measuring read bandwidth ...")
    bw_rows = read_bandwidth([int(s) for s in args.sizes_mb.split(",")], args.repeats)
    large = [r for r in bw_rows if r["size_mb"] >= 256] or bw_rows
    bandwidth = max(r["gb_s"] for r in large)  # beyond the caches
    cfg = load_config([])
    teacher_dir = loading.resolve(cfg.teacher, "teacher")
    models = [{"model": f"teacher {cfg.teacher.name} (torch fp32)", "path": teacher_dir, "source": "measured here"}]
    gguf = loading.bundled_gguf(cfg.teacher, "teacher")
    try:
        import llama_cpp  # noqa: F401

        models.append({"model": f"teacher {gguf.name} (llama.cpp)", "path": gguf, "source": "measured here"})
    except ImportError:
        from rich.markup import escape

        from compress.backends import LLAMACPP_INSTALL

        say(escape(f"llama-cpp-python is not installed, so no llama.cpp row: {LLAMACPP_INSTALL}"))
    run = args.run or newest_run(ROOT / "runs")
    if run is not None:
        for r in json.loads((run / "results.json").read_text())["records"]:
            path = record_path(run, r["path"]) if r.get("path") else None
            if path is not None and r.get("decode_tok_s") and path.exists():
                models.append({"model": f"{r['stage']} {r['role']}:{r['model']} ({r.get('backend')})",
                               "path": path, "source": f"{run.name}/results.json",
                               **({} if args.measure else {"decode_tok_s": r["decode_tok_s"]})})
                if args.measure:
                    models[-1]["source"] = "measured here"
    if any(Path(m["path"]) == teacher_dir for m in models[1:]):  # the run has this teacher already
        models = models[1:]
    rows = []
    for m in models:
        if "decode_tok_s" not in m:
            say(f"measuring decode of {m['model']} ...")
            m["decode_tok_s"] = measure(m["path"], args.threads, 128, args.decode_tokens, args.runs)
        per_token = bytes_per_token(Path(m["path"]))
        ceiling = bandwidth * 1e9 / per_token
        rows.append({**m, "path": str(m["path"]), "bytes_per_token": per_token, "ceiling_tok_s": ceiling,
                     "percent_of_ceiling": 100 * m["decode_tok_s"] / ceiling})
    print_tables(out, bw_rows, bandwidth, rows)
    say(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work skews both figures)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from compress.results import hardware

    args.out.write_text(json.dumps({"hardware": hardware(), "load_average": os.getloadavg(),
                                    "bandwidth_gb_s": bandwidth, "bandwidth": bw_rows,
                                    "run": str(run) if run else None, "models": rows}, indent=2))
    say(f"wrote {args.out}")


def print_tables(out, bw_rows: list[dict], bandwidth: float, rows: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="memory read bandwidth (best of N)")
    for col in ("array MB", "reader", "GB/s"):
        t.add_column(col, justify="right")
    for r in bw_rows:
        t.add_row(str(r["size_mb"]), r["reader"], f"{r['gb_s']:.1f}")
    out.print(t)
    t = Table(title=f"decode vs the bandwidth ceiling ({bandwidth:.1f} GB/s / weight bytes per token)")
    for col in ("model", "decode tok/s from", "MB read / token", "ceiling tok/s", "decode tok/s", "% of ceiling"):
        t.add_column(col, justify="left" if col in ("model", "decode tok/s from") else "right")
    for r in rows:
        t.add_row(r["model"], r["source"], f"{r['bytes_per_token'] / 2**20:.1f}", f"{r['ceiling_tok_s']:.1f}",
                  f"{r['decode_tok_s']:.1f}", f"{r['percent_of_ceiling']:.0f}%")
    out.print(t)


if __name__ == "__main__":
    main()
