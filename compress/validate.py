"""Checks that need the whole config: every problem is gathered, then raised once."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import ListConfig

from compress.errors import Problem, raise_if

DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMATS = ("rotten_tomatoes", "bigbench", "jsonl", "csv", "text", "squad")
METRICS = {"accuracy": "label tasks", "f1": "generative tasks", "exact_match": "generative tasks"}
SCHEDULES = ("cosine", "linear", "constant")


def validate(cfg) -> None:
    """Raise CompressError listing every problem of the shared config sections (data, models, eval, run,
    trainer). Each stage checks its own section (`check` in its module); `compress run` gathers both."""
    raise_if(problems(cfg), "invalid configuration")


def problems(cfg) -> list[Problem]:
    """Every problem of the shared config sections, at once."""
    problems: list[Problem] = []
    problems += _positive(cfg, ["eval.batch_size", "eval.max_new_tokens", "eval.perplexity_blocks", "eval.perplexity_block_tokens",
                                "eval.prefill_tokens", "eval.decode_tokens", "eval.latency_runs",
                                "eval.calibration_tokens",
                                "data.eval_size", "data.max_chars"], strict=True)
    problems += _positive(cfg, ["data.train_size", "data.unlabeled_size", "data.synthetic_unlabeled",
                               "eval.warmup_runs"], strict=False)
    if cfg.eval.threads is not None and cfg.eval.threads < 1:
        problems.append(Problem("eval.threads", cfg.eval.threads, "must be >= 1, or null for torch's default"))
    bad_dtypes = [d for d in cfg.eval.cpu_dtypes if d not in ("float32", "bfloat16")]
    if bad_dtypes or not cfg.eval.cpu_dtypes:
        problems.append(Problem("eval.cpu_dtypes", list(cfg.eval.cpu_dtypes), "a non-empty list of float32 and/or "
                                "bfloat16, e.g. [float32,bfloat16]"))
    if cfg.data.format not in FORMATS:
        problems.append(Problem("data.format", cfg.data.format, f"choose one of: {', '.join(FORMATS)}"))
    if cfg.data.choices_field and cfg.data.format not in ("jsonl", "csv"):
        problems.append(Problem("data.choices_field", cfg.data.choices_field, "per-example choices are read "
                                f"from jsonl or csv files only (data.format={cfg.data.format}; data=bigbench takes "
                                "them from target_scores); unset it or use data=jsonl"))
    generative = cfg.data.format == "squad" or bool(cfg.data.target_field)
    if cfg.data.metric not in METRICS or (cfg.data.metric == "accuracy") == generative and cfg.data.format != "text":
        problems.append(Problem("data.metric", cfg.data.metric, "choose accuracy for a label task, f1 or exact_match "
                                "for a generative one (data=squad, or data.target_field set)"))
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
    keep = cfg.student.keep_layers
    if not (keep is None or keep == "auto" or isinstance(keep, ListConfig | list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in keep)):
        problems.append(Problem("student.keep_layers", keep, "give a list of teacher layer indices, e.g. [0,1,2], "
                                "auto (chosen by measured importance) or null (every keep_every-th layer)"))
    if keep == "auto" and cfg.student.calibration_examples < 1:
        problems.append(Problem("student.calibration_examples", cfg.student.calibration_examples, "must be >= 1"))
    problems += _run_name(cfg.run.name)
    problems += _trainer(cfg.trainer)
    return problems


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
    if m.attn_implementation not in (None, "sdpa", "eager", "flash_attention_2"):
        problems.append(Problem(f"{role}.attn_implementation", m.attn_implementation, "choose sdpa, eager, "
                                "flash_attention_2 (CUDA), or null to measure which is faster"))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", m.device):
        problems.append(Problem(f"{role}.device", m.device, "choose auto, cpu, cuda or cuda:N"))
    elif m.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(Problem(f"{role}.device", m.device, "CUDA is not available on this machine; "
                                "use auto or cpu"))
    from teachers.loading import ARCHITECTURES

    if m.random is not None and m.architecture not in ARCHITECTURES:
        problems.append(Problem(f"{role}.architecture", m.architecture, f"a random model is built as one of: "
                                f"{', '.join(ARCHITECTURES)}"))
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


def schedule_problems(cfg, section: str) -> list[Problem]:
    """The optimization settings a training stage's section shares (`finetune`, `distill`)."""
    o = cfg[section]
    problems = _positive(cfg, [f"{section}.{k}" for k in ("max_steps", "batch_size", "grad_accum", "max_length")],
                         strict=True)
    problems += _positive(cfg, [f"{section}.{k}" for k in ("warmup_steps", "val_every", "val_size")], strict=False)
    if not o.lr > 0:
        problems.append(Problem(f"{section}.lr", o.lr, "must be > 0, e.g. 1e-4"))
    if o.schedule not in SCHEDULES:
        problems.append(Problem(f"{section}.schedule", o.schedule, f"choose one of: {', '.join(SCHEDULES)}"))
    if o.weight_decay < 0 or o.max_grad_norm < 0:
        problems.append(Problem(f"{section}.weight_decay", o.weight_decay, "weight_decay and max_grad_norm must be >= 0"))
    return problems


def _trainer(tcfg) -> list[Problem]:
    problems = []
    if tcfg.checkpoint_every < 1 or tcfg.log_every < 1:
        problems.append(Problem("trainer.checkpoint_every", tcfg.checkpoint_every,
                                "checkpoint_every and log_every must be >= 1"))
    if tcfg.num_nodes < 1:
        problems.append(Problem("trainer.num_nodes", tcfg.num_nodes, "must be >= 1"))
    return problems + _strategy(tcfg)


def _strategy(tcfg) -> list[Problem]:
    """`trainer.strategy` goes straight to Lightning: check the name, and that DeepSpeed is installed."""
    import importlib.util

    from lightning.pytorch.strategies import StrategyRegistry

    names = ["auto", "ddp", "fsdp", "deepspeed"] + [n for n in StrategyRegistry.available_strategies()
                                                     if n not in ("ddp", "fsdp", "deepspeed")]
    if tcfg.strategy not in names:
        return [Problem("trainer.strategy", tcfg.strategy, f"not a Lightning strategy; choose one of: "
                        f"{', '.join(names[:4])} (or {', '.join(names[4:12])}, ...)")]
    if tcfg.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return [Problem("trainer.strategy", tcfg.strategy, "DeepSpeed is not installed: `pip install deepspeed` "
                        "(needs CUDA), or use trainer.strategy=fsdp")]
    if not re.fullmatch(r"auto|\d+|\[\s*\d+(\s*,\s*\d+)*\s*\]|-1", str(tcfg.devices)):
        return [Problem("trainer.devices", tcfg.devices, "a count (2), a list of device indices ([0,1]) or auto")]
    return []
