"""What the training stages share: prompt+answer batches, AdamW with warm-up, the Lightning Trainer."""
from __future__ import annotations

import json
import logging
import math
import random
import zipfile
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from compress.errors import Problem
from compress.evaluate import build_prompt, encode_requests

for _name in ("lightning.pytorch", "lightning.fabric"):  # seeds, device summaries, tips: noise for our users
    logging.getLogger(_name).setLevel(logging.WARNING)


def encode_examples(tokenizer, data_cfg, texts: list[str], answers: list[str], max_length: int,
                    kinds: list[int] | None = None) -> list[dict]:
    """Token ids of `prompt(text) + answer`, with the answer's positions marked.

    Each item: input_ids (T,), answer_mask (T,) True on answer tokens, kind (0 gold, 1 pseudo).
    Prompts longer than `max_length` lose tokens from the left.
    """
    chat = bool(data_cfg.use_chat_template and getattr(tokenizer, "chat_template", None))
    items = []
    for n, (text, answer) in enumerate(zip(texts, answers)):
        ((ctx, (cont,)),) = encode_requests(tokenizer, [build_prompt(tokenizer, text, data_cfg)], [answer], chat)
        ctx = ctx[-(max_length - len(cont)):] if len(ctx) + len(cont) > max_length else ctx
        ids = torch.tensor(ctx + cont)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(ctx):] = True
        items.append({"input_ids": ids, "answer_mask": mask, "kind": kinds[n] if kinds else 0})
    return items


def collate(pad_id: int):
    """Right-pad a list of items into a batch; labels are input_ids with -100 off the answer."""

    def fn(items: list[dict]) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        answer = torch.zeros((len(items), width), dtype=torch.bool)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n], attention[i, :n], answer[i, :n] = it["input_ids"], 1, it["answer_mask"]
        labels = ids.masked_fill(~answer, -100)
        kind = torch.tensor([it["kind"] for it in items])  # (B,)
        batch = {"input_ids": ids, "attention_mask": attention, "answer_mask": answer, "labels": labels,
                 "kind": kind}
        if "index" in items[0]:
            batch["index"] = torch.tensor([it["index"] for it in items])
        return batch

    return fn


class StepBatches:
    """Batch sampler whose micro-batch n is a function of (seed, n) only.

    The examples form one long stream: pass p over the data is a permutation seeded with
    (seed, p). Micro-batch n is the n-th slice of `batch_size * world` indices of that stream,
    and rank r takes the r-th part of it. So a run resumed at any step, or split over several
    processes with the same global batch, sees the same examples at the same step.
    With `lengths`, the stream is cut into groups of `GROUP` global batches; within a group the
    examples are sorted by length before they are sliced into batches, and the batches are
    shuffled (seeded with (seed, group)): every batch is still drawn at random from the data, but
    holds examples of similar length, so less of it is padding (Rotten Tomatoes: 1.2x fewer tokens
    per step).
    `where()` gives (micro-batches already trained, rank, world size) when iteration starts,
    i.e. after Lightning has restored a checkpoint.
    """

    GROUP = 32
    """Global batches per length group: enough to find similar lengths, few enough that a group is a
    small part of a pass and the order stays random."""

    def __init__(self, n_items: int, batch_size: int, total: int, seed: int, where, lengths=None):
        self.n, self.batch_size, self.total, self.seed, self.where = n_items, batch_size, total, seed, where
        self.lengths = lengths
        self._perms: dict[int, list[int]] = {}
        self._groups: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return self.total

    def _index(self, j: int) -> int:
        p, i = divmod(j, self.n)
        if p not in self._perms:
            self._perms = {p: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + p)).tolist()}
        return self._perms[p][i]

    def _global_batch(self, n: int, width: int) -> list[int]:
        """The indices of global micro-batch n (`width` = batch_size * world)."""
        if self.lengths is None:
            return [self._index(j) for j in range(n * width, (n + 1) * width)]
        g, k = divmod(n, self.GROUP)
        if g not in self._groups:
            size = min(self.GROUP, self.total - g * self.GROUP)  # the last group ends with training
            stream = [self._index(j) for j in range(g * self.GROUP * width, (g * self.GROUP + size) * width)]
            stream.sort(key=lambda i: self.lengths[i])
            batches = [stream[b * width: (b + 1) * width] for b in range(size)]
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 7919 + 104729 + g))
            self._groups = {g: [batches[i] for i in order.tolist()]}
        return self._groups[g][k]

    def __iter__(self):
        start, rank, world = self.where()
        for n in range(start, self.total):
            batch = self._global_batch(n, self.batch_size * world)
            yield batch[rank * self.batch_size: (rank + 1) * self.batch_size]


def step_loader(items: list[dict], batch_size: int, pad_id: int, seed: int, trainer):
    """Training batches for `trainer`: deterministic per step, resumable, sharded over ranks, grouped by length."""
    accum = trainer.accumulate_grad_batches

    def where():
        return trainer.global_step * accum, trainer.global_rank, trainer.world_size

    lengths = [len(it["input_ids"]) for it in items]
    sampler = StepBatches(len(items), batch_size, trainer.max_steps * accum, seed, where, lengths)
    # its own generator: iter() draws a worker seed, which must not move the global RNG (dropout)
    return torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=collate(pad_id),
                                       generator=torch.Generator().manual_seed(seed))


def loader(items: list[dict], batch_size: int, pad_id: int, shuffle: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=collate(pad_id),
                                       generator=gen if shuffle else None)


def optimizer_and_schedule(params, ocfg, trainer=None) -> dict:
    """AdamW, linear warm-up, then cosine / linear / constant: Lightning's optimizer dict.

    AdamW is fused (one kernel per tensor instead of a dozen: a distillation step 1.12x faster on a CPU)
    where Lightning does not clip (`make_trainer` leaves clipping to `ClipGradNorm` then, or none is asked)."""
    params = [p for p in params if p.requires_grad]
    fused = trainer is not None and trainer.gradient_clip_val is None and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    opt = torch.optim.AdamW(params, lr=ocfg.lr, weight_decay=ocfg.weight_decay, fused=fused or None)
    warm, total = max(0, ocfg.warmup_steps), max(1, ocfg.max_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if ocfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        if ocfg.schedule == "linear":
            return 1 - frac
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def precision(tcfg, cpu_bf16: bool = False) -> str:
    """Lightning's precision for `trainer.precision=auto`: bf16-mixed on a bf16 GPU; with `cpu_bf16`
    also on a CPU with native bf16 matmuls (AMX or AVX512-BF16), else 32-true."""
    if tcfg.precision != "auto":
        return tcfg.precision
    gpu = torch.cuda.is_available() and tcfg.accelerator in ("auto", "gpu", "cuda")
    if gpu and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if not gpu and cpu_bf16 and cpu_has_bf16():
        return "bf16-mixed"
    return "32-true"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively; elsewhere bf16 autocast is emulated and slower than fp32."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


@contextmanager
def cast_weights(model, dtype: torch.dtype | None):
    """Run a block with the model's floating-point weights and buffers in `dtype` (None: as they are), then
    cast them back. Back, every norm, bias, embedding (and head tied to it) and buffer holds its own values
    again; the other Linear weights hold their `dtype` values, which is what autocast in that dtype
    multiplies with anyway. A bf16 forward this way skips autocast's cast of every activation."""
    if dtype is None:
        yield
        return
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    rounded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - embedded
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    kept = {n: p.detach().clone() for n, p in params.items() if id(p) not in rounded}
    dtypes = {n: p.dtype for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
    model.to(dtype)
    try:
        yield
    finally:
        for n, p in params.items():
            p.data = kept[n] if n in kept else p.data.to(dtypes[n])
        for n, b in buffers.items():
            owner, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(owner), leaf, b)


def train_attention(model, model_cfg, trainer) -> None:
    """Eager attention for bf16 training on a CPU, unless `<role>.attn_implementation` names one.

    PyTorch's fused SDPA kernel for the CPU has a slow bf16 backward pass: it took 27% of a distillation
    step. Under bf16 autocast eager attention made a distillation step 1.17x faster (0.955 against 1.116 s,
    40 steps, Lightning) and a QLoRA step 1.06-1.29x (two probes); in fp32, SDPA is the faster one.
    Only the running model changes: the saved config names no attention implementation.
    """
    bf16_cpu = str(trainer.precision).startswith("bf16") and next(model.parameters()).device.type == "cpu"
    if bf16_cpu and not model_cfg.get("attn_implementation") and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation("eager")


def _devices(value: str):
    value = str(value)
    if value == "auto":
        return "auto"
    if value.startswith("["):
        return [int(v) for v in value.strip("[]").split(",") if v.strip()]
    return int(value)


def _lightning_args(tcfg, cpu_bf16: bool = False) -> dict:
    """What `trainer` passes straight to Lightning: accelerator, devices, strategy, nodes, precision."""
    return {"accelerator": tcfg.accelerator, "devices": _devices(tcfg.devices), "strategy": tcfg.strategy,
            "num_nodes": tcfg.num_nodes, "precision": precision(tcfg, cpu_bf16)}


def _refusal(args: dict) -> str | None:
    """Lightning's reason for refusing a Trainer with `args`, in one line; None if it accepts them.
    Construction only checks and resolves the settings: no process starts, a few milliseconds."""
    try:
        L.Trainer(**args, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False)
    except Exception as e:  # Lightning raises ValueError, TypeError, MisconfigurationException, ...
        return " ".join(str(e).split()) or type(e).__name__
    return None


def trainer_problems(tcfg) -> list[Problem]:
    """The `trainer` settings Lightning refuses on this machine, asked of Lightning itself with the
    precision each training stage uses (fine-tuning `precision(tcfg)`, distillation
    `precision(tcfg, cpu_bf16=True)`), so that a refusal comes before any stage starts.

    The key named is the one whose neutral value (strategy auto, precision 32-true, accelerator auto,
    devices 1, one node) alone makes Lightning accept; the fix names the presets it accepts here.
    """
    for cpu_bf16 in (False, True):
        args = _lightning_args(tcfg, cpu_bf16)
        reason = _refusal(args)
        if reason is None:
            continue
        neutral = {"strategy": "auto", "precision": "32-true", "accelerator": "auto", "devices": 1, "num_nodes": 1}
        key = next((k for k, v in neutral.items() if args[k] != v and _refusal({**args, k: v}) is None), None)
        if key is None:  # several settings at fault: the first that Lightning's message names, else the accelerator
            named = [k for k in ("strategy", "precision", "devices") if k.rstrip("s") in reason.lower()]
            key = min(named, key=lambda k: reason.lower().index(k.rstrip("s"))) if named else "accelerator"
        value = tcfg[key] if key != "precision" or tcfg.precision != "auto" else f"auto ({args['precision']})"
        first = reason.split(". ")[0].rstrip(".")  # Lightning's own advice after it may not fit this machine
        return [Problem(f"trainer.{key}", value, f"Lightning refuses it here: {first}; {_working_presets(tcfg)}")]
    return []


def _working_presets(tcfg) -> str:
    """The `trainer=` presets that Lightning accepts on this machine, those with `tcfg`'s strategy first."""
    from omegaconf import OmegaConf

    from compress.config import config_dir
    from compress.schema import TrainerConfig

    ok = []
    for f in sorted((config_dir() / "trainer").glob("*.yaml")):
        preset = OmegaConf.merge(OmegaConf.structured(TrainerConfig), OmegaConf.load(f))
        if all(_refusal(_lightning_args(preset, b)) is None for b in (False, True)):
            ok.append((preset.strategy != tcfg.strategy, f"trainer={f.stem}"))
    if not ok:
        return "no trainer preset works on this machine; set trainer.accelerator=cpu trainer.strategy=auto"
    names = [n for _, n in sorted(ok)]
    return f"use a preset that works on this machine: {' or '.join(names[:3])}{' (or ...)' if names[3:] else ''}"


class Resume(L.Callback):
    """Completes Lightning's checkpoints so that a resumed run continues exactly: the RNG states
    (dropout, e.g. LoRA's) go in with the weights, optimizer, scheduler and loop state."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["compress_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        rng = checkpoint.get("compress_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


class GlobalLoss(L.Callback):
    """Logs `train/loss_global`: the training loss averaged over every rank (equal to
    `train/loss` in one process), so curves of runs on different process counts compare."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            pl_module.log("train/loss_global", loss.detach() * trainer.accumulate_grad_batches, sync_dist=True,
                          on_step=True, on_epoch=False)


class StepProgressBar(RichProgressBar):
    """Lightning's bar counts the batches of an epoch: with step-based training (max_steps,
    max_epochs=-1) it read `Epoch 0/-2`, and with grad_accum > 1 it counted micro-batches. This one
    reads `step n/max_steps` (optimizer steps, right after a resume too) with the loss beside it,
    on stderr beside the pipeline's messages (stdout stays for tables and JSON)."""

    def __init__(self) -> None:
        super().__init__(console_kwargs={"stderr": True})

    def description(self) -> str:
        return f"step {self.trainer.global_step}/{self.trainer.max_steps}"

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return self.description()

    def _show_steps(self) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=self.trainer.global_step,
                                 total=self.trainer.max_steps, description=self.description())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self._show_steps()
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger has no versions: out/logs/metrics.csv
        return items

    def configure_columns(self, trainer) -> list:
        from lightning.pytorch.callbacks.progress.rich_progress import BatchesProcessedColumn
        from rich.text import Text

        bar = self

        class Count(BatchesProcessedColumn):  # n/total of validation; the training bar's description has it
            def render(self, task):
                return Text() if task.id == bar.train_progress_bar_id else super().render(task)

        return [Count(self.theme.batch_progress) if isinstance(c, BatchesProcessedColumn) else c
                for c in super().configure_columns(trainer)]


class ClipGradNorm(L.Callback):
    """Clip the global gradient norm before each optimizer step (what `gradient_clip_val` does), for a
    fused AdamW, which Lightning will not clip under mixed precision."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


def make_trainer(tcfg, ocfg, out: Path, has_val: bool, cpu_bf16: bool = False):
    """A Lightning Trainer from the `trainer` and stage optimisation settings; logs and checkpoints in `out`.

    Strategy, devices, nodes and precision pass straight to Lightning. Every
    `checkpoint_every` steps a full checkpoint (trainable weights, optimizer, scheduler, loop
    state, RNG) goes to `out/checkpoints/`; `fit(..., ckpt_path=last_checkpoint(out))` resumes.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from compress import dist
    from compress.artifact import PARTIAL, TRAINING

    args = _lightning_args(tcfg, cpu_bf16)
    # Lightning refuses to clip for a fused optimizer under mixed precision (an fp16 scaler unscales
    # inside it); without a scaler, and where every rank holds whole gradients (not FSDP), a callback clips
    own_clip = bool(ocfg.max_grad_norm) and args["precision"] != "16-mixed" and "fsdp" not in str(args["strategy"])
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=tcfg.checkpoint_every,
                           save_last=True, save_top_k=1, enable_version_counter=False)
    val = {"val_check_interval": ocfg.val_every * ocfg.grad_accum, "check_val_every_n_epoch": None} \
        if has_val and ocfg.val_every > 0 else {"limit_val_batches": 0}
    trainer = L.Trainer(
        max_steps=ocfg.max_steps, accumulate_grad_batches=ocfg.grad_accum, **args,
        use_distributed_sampler=False,  # StepBatches shards
        gradient_clip_val=None if own_clip else ocfg.max_grad_norm or None, log_every_n_steps=tcfg.log_every,
        enable_progress_bar=tcfg.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        logger=CSVLogger(out, name="logs", version=""),
        callbacks=[ckpt, Resume(), GlobalLoss()] + ([ClipGradNorm(ocfg.max_grad_norm)] if own_clip else [])
        + ([StepProgressBar()] if tcfg.progress_bar else []),
        default_root_dir=out, **val,
    )
    if not dist.is_follower() and (out / PARTIAL).exists():
        attempt = json.loads((out / PARTIAL).read_text())["attempt"]
        (out / TRAINING).write_text(json.dumps({"attempt": attempt}))
    return trainer


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in `out/checkpoints` (a kill while saving leaves a truncated
    file: torch checkpoints are zip archives, whose directory is written last)."""
    files = sorted((out / "checkpoints").glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime),
                   reverse=True)
    for path in files:
        if zipfile.is_zipfile(path):
            return path
    return None
