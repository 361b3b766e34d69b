"""Checks that need the whole config: every problem is gathered, then raised once."""
from __future__ import annotations

import re
from pathlib import Path

from compress.errors import Problem, raise_if

DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMATS = ("rotten_tomatoes", "bigbench", "jsonl", "csv", "text")


def validate(cfg) -> None:
    """Raise CompressError listing every problem in `cfg` (a composed job config)."""
    from compress.pipeline import STAGES

    problems: list[Problem] = []
    problems += _positive(cfg, ["eval.batch_size", "eval.perplexity_blocks", "eval.perplexity_block_tokens",
                                "eval.prefill_tokens", "eval.decode_tokens", "eval.latency_runs",
                                "data.eval_size", "data.max_chars"], strict=True)
    problems += _positive(cfg, ["data.train_size", "data.unlabeled_size", "eval.warmup_runs"], strict=False)
    if cfg.eval.threads is not None and cfg.eval.threads < 1:
        problems.append(Problem("eval.threads", cfg.eval.threads, "must be >= 1, or null for torch's default"))
    if cfg.data.format not in FORMATS:
        problems.append(Problem("data.format", cfg.data.format, f"choose one of: {', '.join(FORMATS)}"))
    if "{text}" not in cfg.data.instruction:
        problems.append(Problem("data.instruction", cfg.data.instruction, "must contain {text}, where the input goes"))
    for key in ("data.path", "data.perplexity_path", "teacher.path", "student.path"):
        value = _get(cfg, key)
        if value and not Path(value).expanduser().exists():
            problems.append(Problem(key, value, "no such file or folder"))
    for role in ("teacher", "student"):
        problems += _model(cfg[role], role)
    if cfg.student.keep_every < 1:
        problems.append(Problem("student.keep_every", cfg.student.keep_every, "must be >= 1"))
    unknown = [s for s in cfg.pipeline.stages if s not in STAGES]
    if unknown or not cfg.pipeline.stages:
        problems.append(Problem("pipeline.stages", list(cfg.pipeline.stages),
                                f"unknown or no stages; stages are: {', '.join(STAGES)}"))
    problems += _run_name(cfg.run.name)
    raise_if(problems, "invalid configuration")


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _positive(cfg, keys: list[str], strict: bool) -> list[Problem]:
    bad = []
    for key in keys:
        v = _get(cfg, key)
        if v < 1 if strict else v < 0:
            bad.append(Problem(key, v, f"must be {'>= 1' if strict else '>= 0'}"))
    return bad


def _model(m, role: str) -> list[Problem]:
    problems = []
    if m.dtype not in DTYPES:
        problems.append(Problem(f"{role}.dtype", m.dtype, f"choose one of: {', '.join(DTYPES)}"))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", m.device):
        problems.append(Problem(f"{role}.device", m.device, "choose auto, cpu, cuda or cuda:N"))
    if m.random is not None:
        r = m.random
        for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "max_positions"):
            if r[k] < 1:
                problems.append(Problem(f"{role}.random.{k}", r[k], "must be >= 1"))
        if r.num_heads >= 1 and r.hidden_size % r.num_heads:
            problems.append(Problem(f"{role}.random.num_heads", r.num_heads, "must divide random.hidden_size"))
        if r.num_kv_heads >= 1 and r.num_heads % r.num_kv_heads:
            problems.append(Problem(f"{role}.random.num_kv_heads", r.num_kv_heads, "must divide random.num_heads"))
    return problems


def _run_name(name) -> list[Problem]:
    if name is None:
        return []
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)) or ".." in str(name):
        return [Problem("run.name", name, "use letters, digits, '.', '_' and '-' only (no '/' or '..'): "
                                          "the run folder must stay inside run.root")]
    return []
