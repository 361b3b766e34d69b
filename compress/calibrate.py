"""CPU speed per model: threads, attention implementation and dtype chosen by measurement.

No rule predicts the fastest setting of a model on a CPU: a Qwen2.5-0.5B with real weights ran a
128-token forward in 6.1 s on 2 threads with SDPA, 1.5 s with eager attention and 1.0 s on one
thread, while SmolLM2 and random weights of the same shape were fastest on 2 threads. So before a
model is measured on the CPU, `calibrate` times a few forwards of every candidate (threads x
attention x dtype), keeps the fastest, and caches the choice per model folder and machine
(`<cache>/calibration.json`). `eval.threads`, `teacher.attn_implementation` / `student.` and an
explicit `dtype` fix their axis; `eval.calibrate=false` keeps torch's defaults.

The candidate dtypes are `eval.cpu_dtypes` (float32 alone by default: bf16 is faster on some CPUs
but changes the measured accuracy, so it is chosen only where asked).
"""
from __future__ import annotations

import copy
import json
import os
import platform
from pathlib import Path

import torch

from compress.errors import CompressError, Problem
from compress.evaluate import measure_latency
from compress.hub import cache_root, text_hash

ATTENTION = ("sdpa", "eager")
TORCH_THREADS = torch.get_num_threads()
"""torch's own thread count, read at import (before any calibration changed it): the candidates' base."""


def machine() -> str:
    """The CPU model, core count and torch version: what a cached choice is valid for."""
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} | {os.cpu_count()} cpus | torch {torch.__version__}"


def thread_candidates(default: int) -> list[int]:
    """1, half and all of torch's default thread count."""
    return sorted({1, max(1, default // 2), default})


def candidates(eval_cfg, model_cfg, default_threads: int, softcapped: bool = False) -> list[dict]:
    """Every (threads, attention, dtype) to time, with the fixed axes fixed; a model with attention soft-capping
    (`softcapped`) only with eager attention."""
    threads = [eval_cfg.threads] if eval_cfg.threads else thread_candidates(default_threads)
    attn = [model_cfg.attn_implementation] if model_cfg.attn_implementation else list(ATTENTION)
    if softcapped and not model_cfg.attn_implementation:
        attn = ["eager"]  # SDPA drops Gemma-2's attention logit soft-capping: results would depend on speed
    dtypes = [model_cfg.dtype] if model_cfg.dtype != "auto" else list(eval_cfg.cpu_dtypes)
    return [{"threads": t, "attn_implementation": a, "dtype": d} for d in dtypes for a in attn for t in threads]


def apply(model, choice: dict) -> None:
    """Set a candidate on a loaded model (and torch's thread pool)."""
    torch.set_num_threads(choice["threads"])
    model.set_attn_implementation(choice["attn_implementation"])
    model.to(getattr(torch, choice["dtype"]))


def time_forward(model, tokens: int, decode: int, runs: int) -> float:
    """Seconds of a `tokens`-long prefill plus `decode` cached greedy steps (batch 1), from the medians of
    `runs` after one untimed run (compress.evaluate.measure_latency, the record's own timing). Both matter:
    scoring is prefill-like, generation decode-like."""
    vocab = model.config.vocab_size
    ids = [(i * 7919) % (vocab - 1) + 1 for i in range(tokens)]  # fixed, spread over the vocabulary
    timed = measure_latency(model, ids, decode, 1, runs)
    return timed["prefill_ms"] / 1000 + decode / timed["decode_tok_s"]


def calibrate(model, folder: Path, model_cfg, eval_cfg, fingerprint: str, cache: Path | None = None) -> dict:
    """The fastest candidate for `model` (loaded from `folder`, on the CPU), applied to it: a dict with
    threads, attn_implementation, dtype, the timings of every candidate (seconds) and whether it came
    from the cache (`cache`, default `<cache root>/calibration.json`). One candidate (every axis fixed)
    is applied without timing."""
    softcapped = bool(getattr(model.config, "attn_logit_softcapping", None))
    todo = candidates(eval_cfg, model_cfg, TORCH_THREADS, softcapped)
    key = text_hash(json.dumps([fingerprint, machine(), todo]))[:24]
    cache = cache or cache_root() / "calibration.json"
    known = _read(cache)
    if key in known:
        choice = {**known[key], "cached": True}
    elif len(todo) == 1:
        choice = {**todo[0], "timings": {}, "cached": False}
    else:
        timings, native = {}, str(next(model.parameters()).dtype).removeprefix("torch.")
        copies: dict[str, object] = {}  # another dtype is timed on a copy: casting back would round the weights
        for cand in todo:
            try:
                target = model if cand["dtype"] == native else copies.setdefault(cand["dtype"], copy.deepcopy(model))
                apply(target, cand)
                timings[_name(cand)] = time_forward(target, eval_cfg.calibration_tokens, 8, 2)
            except Exception as e:  # an attention implementation this model does not support
                timings[_name(cand)] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        copies.clear()
        timed = [c for c in todo if isinstance(timings[_name(c)], float)]
        if not timed:
            raise CompressError(Problem("eval.calibrate", True, f"no candidate setting ran this model ({folder}): "
                                        f"{timings}; set eval.calibrate=false, or fix the failing setting"))
        best = min(timed, key=lambda c: timings[_name(c)])
        choice = {**best, "timings": timings, "model": str(folder), "machine": machine(), "cached": False}
        _write(cache, {**_read(cache), key: {k: v for k, v in choice.items() if k != "cached"}})
    apply(model, choice)
    return choice


def _name(cand: dict) -> str:
    n = cand["threads"]
    return f"{n} thread{'s' if n != 1 else ''}, {cand['attn_implementation']}, {cand['dtype']}"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
