"""Load on `compress serve`: requests/s and p50/p99 latency at 1, 4 and 16 concurrent clients.

    python benchmarks/serve_load.py FOLDER [--requests 64] [--seconds 60] [--route classify|completions]

Starts `compress serve FOLDER` in its own process on a free port of 127.0.0.1, waits for /health, then
for each concurrency C runs C clients (httpx, one connection each) that send requests back to back until
`--requests` are done or `--seconds` have passed. classify requests carry one review each; completions ask
for `--max-tokens` greedy tokens. Writes benchmarks/results/serve_load.json with the hardware and the
load average.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["A wonderful, moving film with a great cast.", "Dull, predictable and far too long.",
         "The best comedy I have seen this year.", "I walked out after an hour.",
         "Beautifully shot, but the story goes nowhere.", "A clever script and two great performances."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path, port: int, threads: int | None) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "compress", "serve", str(folder), "--port", str(port)]
    proc = subprocess.Popen(cmd + (["--threads", str(threads)] if threads else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"compress serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("compress serve did not answer /health within 120 s")


async def load(url: str, route: str, clients: int, requests: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    latencies: list[float] = []
    sent = 0
    stop_at = time.perf_counter() + seconds

    def body(n: int) -> dict:
        text = TEXTS[n % len(TEXTS)]
        return {"input": [text]} if route == "classify" else {"prompt": f"Review: {text}\nSummary:",
                                                               "max_tokens": max_tokens}

    async def client() -> None:
        nonlocal sent
        async with httpx.AsyncClient(timeout=300) as http:
            while sent < requests and time.perf_counter() < stop_at:
                n, sent = sent, sent + 1
                t0 = time.perf_counter()
                r = await http.post(f"{url}/v1/{route}", json=body(n))
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"route": route, "clients": clients, "requests": len(latencies), "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": q[98] * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--route", choices=("classify", "completions"), default="classify")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=64, help="per concurrency level, at most")
    p.add_argument("--seconds", type=float, default=60, help="per concurrency level, at most")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from rich.table import Table

    from compress.console import out
    from compress.results import hardware

    start_hw = hardware()
    port = free_port()
    server = start(args.folder, port, args.threads)
    try:
        rows = [asyncio.run(load(f"http://127.0.0.1:{port}", args.route, c, args.requests, args.seconds,
                                 args.max_tokens)) for c in map(int, args.clients.split(","))]
    finally:
        server.terminate()
        server.wait(30)
    t = Table(title=f"compress serve {args.folder} /v1/{args.route} (load {start_hw['load_average'][0]:.2f})")
    for col in ("clients", "requests", "requests/s", "p50 ms", "p99 ms"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["clients"]), str(r["requests"]), f"{r['requests_per_s']:.1f}", f"{r['p50_ms']:.0f}",
                  f"{r['p99_ms']:.0f}")
    out.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": start_hw, "load_average_end": hardware()["load_average"],
                                    "folder": str(args.folder), "rows": rows}, indent=2))
    out.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
