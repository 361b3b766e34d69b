"""One place that turns a path into something to time and score: `open_backend(path)`.

A backend offers `latency(prompt_ids, decode_tokens, warmup, runs) -> {prefill_ms, decode_tok_s}`
and, where it can, a logits function for `compress.evaluate` (accuracy, perplexity).

| path | backend |
| --- | --- |
| a stage folder (has `model/`) | that `model/` |
| a folder with `config.json` + safetensors | `torch` (fp32 on CPU) |
| a folder with `model.onnx` | `onnxruntime` (the export stage's decode loop: IO binding, preallocated KV cache) |
| a `.gguf` file | `llama.cpp` (optional extra: `pip install 'compress[llamacpp]'`) |
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from compress import extras
from compress.errors import CompressError, Problem
from compress.evaluate import LogitsFn, count_params, measure_latency, torch_logits_fn, weights_size_mb

LLAMACPP_INSTALL = (f"{extras.install('llamacpp')} (llama-cpp-python compiles llama.cpp from source: about "
                    "10 minutes on 2 cores)")


@dataclass
class Backend:
    name: str
    """torch, onnxruntime or llama.cpp (plus a variant, e.g. `torch bf16`)."""
    path: Path
    latency: Callable[[list[int], int, int, int], dict]
    """(prompt ids, decode tokens, warm-up runs, timed runs) -> {prefill_ms, decode_tok_s}, medians."""
    vocab_size: int
    size_mb: float
    """Weights on disk (for an in-memory variant: its tensors' bytes)."""
    params: int | None = None
    tokenizer: object | None = None
    logits_fn: LogitsFn | None = None
    """(ids (B, T), mask (B, T), positions) -> logits (B, K, V), when the backend can score."""
    max_tokens: int | None = None
    """Longest sequence (prompt + decode) the model takes, when known."""
    extra: dict = field(default_factory=dict)


def model_path(spec: str | Path) -> Path:
    """A stage folder's `model/`, else the path itself; CompressError when it does not exist."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise CompressError(Problem("MODEL", str(spec), "no such file or folder; give a model folder, a run's "
                                    "stage folder or a .gguf file"))
    return path / "model" if (path / "model").is_dir() else path


def open_backend(spec: str | Path, threads: int | None = None) -> Backend:
    """The backend that runs the model at `spec` (see the module table)."""
    path = model_path(spec)
    if threads:
        torch.set_num_threads(threads)
    if path.suffix == ".gguf":
        return llamacpp_backend(path, threads)
    if path.is_dir() and (path / "model.onnx").is_file():
        return onnx_folder(path, threads)
    exported = sorted(p.parent.name for p in path.glob("*/model.onnx")) if path.is_dir() else []
    if exported and not (path / "config.json").is_file():
        raise CompressError(Problem("MODEL", str(spec), f"holds several exported models: bench one of "
                                    f"{', '.join(str(path / e) for e in exported)}"))
    return torch_folder(path)


def onnx_folder(path: Path, threads: int | None = None) -> Backend:
    """An exported folder (model.onnx + tokenizer) through onnxruntime, with the export stage's
    lean decode loop (IO binding, preallocated KV cache)."""
    from compress import ort

    ort.require_onnx("MODEL")
    try:
        lm = ort.OnnxLM.open(path, threads)
    except CompressError:
        raise
    except Exception as e:  # onnxruntime's own errors for a corrupt or foreign graph
        raise CompressError(Problem("MODEL", str(path), f"onnxruntime cannot open model.onnx ({str(e)[:200]}); "
                                    "re-export it with `compress run pipeline=export`")) from None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return Backend("onnxruntime", path, lambda ids, n, w, r: ort.measure_latency(lm, ids, n, w, r), lm.vocab,
                   weights_size_mb(path), None, tok, ort.logits_fn(lm), _max_positions(path), {"lm": lm})


def _max_positions(path: Path) -> int | None:
    import json

    config = path / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None


def torch_folder(path: Path, dtype: str = "float32") -> Backend:
    from omegaconf import OmegaConf

    from compress.schema import ModelConfig
    from teachers import loading

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": str(path), "device": "cpu", "dtype": dtype})
    model, tok = loading.load(loading.check_folder(path, "MODEL", False), cfg, "model")
    return torch_backend(model, tok, path, size_mb=weights_size_mb(path))


def torch_backend(model, tokenizer, path: Path, name: str = "torch", size_mb: float | None = None) -> Backend:
    """A loaded PyTorch model (any dtype or quantization that keeps the HF forward signature)."""
    if size_mb is None:
        size_mb = tensor_bytes(model) / 2**20
    return Backend(name, path, lambda ids, n, w, r: measure_latency(model, ids, n, w, r),
                   model.config.vocab_size, size_mb, count_params(model), tokenizer, torch_logits_fn(model),
                   getattr(model.config, "max_position_embeddings", None), {"model": model})


def tensor_bytes(model) -> int:
    """Bytes of a module's parameters and buffers, plus packed int8 weights of dynamic quantization."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total


# --------------------------------------------------------------------------- llama.cpp


def llamacpp_backend(gguf: Path, threads: int | None = None, logits_all: bool = False, n_ctx: int = 2048,
                     tokenizer=None) -> Backend:
    """llama.cpp through llama-cpp-python (not run by the test suite: an optional extra that
    compiles from source); `logits_all=True` also gives a logits function (llama.cpp then
    keeps every position's logits, in `llm.scores`)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise CompressError(Problem("MODEL", str(gguf), f"a .gguf file runs on llama.cpp, which is not installed: "
                                    f"{LLAMACPP_INSTALL}")) from None
    import os

    def open_llm(all_logits: bool):
        return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads or torch.get_num_threads(),
                     logits_all=all_logits, verbose=False)

    llm = open_llm(logits_all)
    fn = _llamacpp_logits_fn(llm) if logits_all else None
    timed = open_llm(False) if logits_all else llm  # keeping every position's logits would slow its prefill
    return Backend("llama.cpp", gguf, lambda ids, n, w, r: llamacpp_latency(timed, ids, n, w, r), llm.n_vocab(),
                   os.path.getsize(gguf) / 2**20, None, tokenizer, fn, n_ctx, {"llm": llm})


def llamacpp_latency(llm, prompt_ids: list[int], decode_tokens: int, warmup: int, runs: int) -> dict:
    """Same protocol as `measure_latency`: prefill ms of the prompt, then greedy decode tok/s
    (llama.cpp's own greedy sampler picks each next token from the last logits)."""

    def prefill() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        return time.perf_counter() - t0

    def decode() -> float:
        prefill()
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([llm.sample(top_k=1, temp=0.0)])
        return decode_tokens / (time.perf_counter() - t0)

    for _ in range(warmup):
        decode()
    prefill_s = statistics.median(prefill() for _ in range(runs))
    tok_s = statistics.median(decode() for _ in range(runs))
    return {"prefill_ms": prefill_s * 1000, "decode_tok_s": tok_s}


def _llamacpp_logits_fn(llm) -> LogitsFn:
    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions=None) -> torch.Tensor:
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            n = sum(mask)
            llm.reset()
            llm.eval(ids[:n])
            scores = torch.from_numpy(llm.scores[:n].copy())  # (n, V)
            pos = list(range(len(ids))) if positions is None else positions
            rows.append(torch.stack([scores[p] if p < n else torch.zeros(scores.shape[1]) for p in pos]))
        return torch.stack(rows)  # (B, K, V)

    return logits
