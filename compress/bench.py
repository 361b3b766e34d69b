"""`compress bench MODEL`: latency only (prefill at several prompt lengths, decode tok/s, peak
memory) for any backend `open_backend` knows, with the same protocol as every stage's evaluation."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from compress.backends import open_backend
from compress.console import progress
from compress.errors import CompressError, Problem
from compress.evaluate import peak_memory


def bench(spec: str | Path, threads: int | None = None, prompt_lengths=(32, 128, 512), decode_tokens: int = 64,
          warmup: int = 1, runs: int = 5) -> dict:
    """Open the model, then time prefill and decode after prompts of each length (random token ids)."""
    problems = [Problem("--prompt-lengths", n, "must be >= 1") for n in prompt_lengths if n < 1]
    problems += [Problem(k, v, "must be >= 1") for k, v in (("--decode-tokens", decode_tokens), ("--runs", runs),
                                                            ("--threads", threads or 1)) if v < 1]
    if problems:
        raise CompressError(problems)
    with peak_memory(torch.device("cpu")) as mem:
        backend = open_backend(spec, threads)
        longest = max(prompt_lengths) + decode_tokens
        if backend.max_tokens and longest > backend.max_tokens:
            raise CompressError(Problem("--prompt-lengths", max(prompt_lengths), f"prompt + {decode_tokens} decoded "
                                        f"tokens exceeds the model's {backend.max_tokens} positions"))
        gen = torch.Generator().manual_seed(0)
        rows = []
        with progress() as bar:
            task = bar.add_task(f"bench {backend.name}", total=len(prompt_lengths))
            for n in prompt_lengths:
                ids = torch.randint(0, backend.vocab_size, (n,), generator=gen).tolist()
                rows.append({"prompt_tokens": n, **backend.latency(ids, decode_tokens, warmup, runs)})
                bar.advance(task)
    return {"model": str(spec), "path": str(backend.path), "backend": backend.name,
            "threads": threads or torch.get_num_threads(), "decode_tokens": decode_tokens, "runs": runs,
            "size_mb": backend.size_mb, "params": backend.params, "peak_mem_mb": mem["peak_mem_mb"], "rows": rows}


def table(result: dict) -> Table:
    params = f", {result['params'] / 1e6:.1f} M params" if result.get("params") else ""
    t = Table(title=f"bench {escape(result['model'])} ({result['backend']}, {result['threads']} threads, "
                    f"{result['size_mb']:.1f} MB{params}, peak {result['peak_mem_mb']:.0f} MB)")
    for col in ("prompt tokens", "prefill ms", "prefill tok/s", f"decode tok/s ({result['decode_tokens']} new)"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        t.add_row(str(r["prompt_tokens"]), f"{r['prefill_ms']:.1f}", f"{r['prompt_tokens'] / r['prefill_ms'] * 1000:.0f}",
                  f"{r['decode_tok_s']:.1f}")
    return t
