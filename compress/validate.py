"""Checks that need the whole config: every problem is gathered, then raised once."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from compress.errors import Problem, raise_if

DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMATS = ("rotten_tomatoes", "bigbench", "jsonl", "csv", "text")
SCHEDULES = ("cosine", "linear", "constant")


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
    problems += _training(cfg)
    problems += _compression(cfg)
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
    elif m.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(Problem(f"{role}.device", m.device, "CUDA is not available on this machine; "
                                "use auto or cpu"))
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


def _training(cfg) -> list[Problem]:
    from compress.training import trainer_problems
    from students.distill import DIVERGENCES  # the one list of each, kept beside the code that uses it
    from teachers.finetune import METHODS

    problems = []
    for section in ("finetune", "distill"):
        o = cfg[section]
        problems += _positive(cfg, [f"{section}.{k}" for k in ("max_steps", "batch_size", "grad_accum",
                                                               "max_length")], strict=True)
        problems += _positive(cfg, [f"{section}.{k}" for k in ("warmup_steps", "val_every", "val_size")], strict=False)
        if not o.lr > 0:
            problems.append(Problem(f"{section}.lr", o.lr, "must be > 0, e.g. 1e-4"))
        if o.schedule not in SCHEDULES:
            problems.append(Problem(f"{section}.schedule", o.schedule, f"choose one of: {', '.join(SCHEDULES)}"))
        if o.weight_decay < 0 or o.max_grad_norm < 0:
            problems.append(Problem(f"{section}.weight_decay", o.weight_decay, "weight_decay and max_grad_norm must be >= 0"))
    d, t = cfg.distill, cfg.teacher
    if not d.temperature > 0:
        problems.append(Problem("distill.temperature", d.temperature, "must be > 0 (1 = the plain distribution, "
                                "2 is a common choice)"))
    weights = {k: d[k] for k in ("soft_weight", "pseudo_weight", "hard_weight", "hidden_weight")}
    for k, v in weights.items():
        if v < 0:
            problems.append(Problem(f"distill.{k}", v, "must be >= 0"))
    if all(v == 0 for v in weights.values()):
        problems.append(Problem("distill.soft_weight", 0, "soft_weight, pseudo_weight, hard_weight and hidden_weight are all 0, "
                                "so the student would learn nothing; set at least one > 0"))
    if d.divergence not in DIVERGENCES:
        problems.append(Problem("distill.divergence", d.divergence, f"choose one of: {', '.join(DIVERGENCES)}"))
    if not 0 < d.jsd_beta < 1:
        problems.append(Problem("distill.jsd_beta", d.jsd_beta, "must be in (0, 1)"))
    if d.soft_on not in ("all", "answer"):
        problems.append(Problem("distill.soft_on", d.soft_on, "choose all or answer"))
    if d.topk_cache < 0:
        problems.append(Problem("distill.topk_cache", d.topk_cache, "must be >= 0 (0 = teacher on the fly)"))
    elif d.topk_cache > 0 and d.divergence != "forward_kl":
        problems.append(Problem("distill.topk_cache", d.topk_cache, "the top-K cache supports "
                                "distill.divergence=forward_kl only; set topk_cache=0 for reverse_kl or jsd"))
    if d.topk_cache > 0 and d.hidden_weight > 0:
        problems.append(Problem("distill.topk_cache", d.topk_cache, "hidden-state distillation needs the teacher's "
                                "activations, which the top-K cache does not hold; set topk_cache=0 or hidden_weight=0"))
    if t.method not in METHODS:
        problems.append(Problem("teacher.method", t.method, f"choose one of: {', '.join(METHODS)}"))
    if t.lora.r < 1 or t.lora.alpha <= 0:
        problems.append(Problem("teacher.lora.r", t.lora.r, "r must be >= 1 and alpha > 0"))
    if not 0 <= t.lora.dropout < 1:
        problems.append(Problem("teacher.lora.dropout", t.lora.dropout, "must be in [0, 1)"))
    if t.quant.quant_type not in ("nf4", "fp4"):
        problems.append(Problem("teacher.quant.quant_type", t.quant.quant_type, "choose nf4 or fp4"))
    if t.quant.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(Problem("teacher.quant.compute_dtype", t.quant.compute_dtype,
                                "choose auto, float32, bfloat16 or float16"))
    if cfg.trainer.checkpoint_every < 1 or cfg.trainer.log_every < 1:
        problems.append(Problem("trainer.checkpoint_every", cfg.trainer.checkpoint_every,
                                "checkpoint_every and log_every must be >= 1"))
    if cfg.trainer.num_nodes < 1:
        problems.append(Problem("trainer.num_nodes", cfg.trainer.num_nodes, "must be >= 1"))
    problems += _strategy(cfg.trainer)
    if {"finetune_teacher", "distill"} & set(cfg.pipeline.stages) and not any(p.key.startswith("trainer.") for p in problems):
        problems += trainer_problems(cfg.trainer)  # what Lightning itself refuses on this machine
    return problems


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


def _compression(cfg) -> list[Problem]:
    from compress.stages.quantize import BITS
    from students.prune import HEADS, IMPORTANCE

    p, q = cfg.prune, cfg.quantize
    problems = [Problem(f"prune.{k}", p[k], "must be in [0, 1): the fraction removed (0 removes nothing)")
                for k in ("mlp_ratio", "head_ratio") if not 0 <= p[k] < 1]
    if p.heads not in HEADS:
        problems.append(Problem("prune.heads", p.heads, f"choose one of: {', '.join(HEADS)}"))
    if p.importance not in IMPORTANCE:
        problems.append(Problem("prune.importance", p.importance, f"choose one of: {', '.join(IMPORTANCE)}"))
    if not p.targets:
        problems.append(Problem("prune.targets", list(p.targets), "name the MLP's input projections, "
                                "e.g. [gate_proj, up_proj]"))
    problems += _positive(cfg, ["prune.round_to", "prune.calibration_batches", "prune.calibration_batch_size",
                                "quantize.calibration_samples", "quantize.calibration_batch_size"], strict=True)
    problems += _positive(cfg, ["prune.recovery_steps"], strict=False)
    if not p.recovery_lr > 0:
        problems.append(Problem("prune.recovery_lr", p.recovery_lr, "must be > 0, e.g. 2e-4"))
    if any(i < 0 for i in p.drop_layers):
        problems.append(Problem("prune.drop_layers", list(p.drop_layers), "layer indices are 0-based (>= 0)"))
    if q.bits not in BITS:
        problems.append(Problem("quantize.bits", q.bits, f"GPTQ supports {', '.join(map(str, BITS))} bits"))
    if q.group_size != -1 and q.group_size < 1:
        problems.append(Problem("quantize.group_size", q.group_size, "must be >= 1 (a divisor of every layer's "
                                "input width, e.g. 32, 64 or 128), or -1 for one group per row"))
    if not 0 < q.damp_percent < 1:
        problems.append(Problem("quantize.damp_percent", q.damp_percent, "must be in (0, 1), e.g. 0.05"))
    return problems
