"""Stage `finetune_teacher`: QLoRA (or LoRA, or full) fine-tuning of the teacher, in Lightning.

Consumes: the teacher. Produces: the fine-tuned teacher, which becomes the reference; the student is
handed on unchanged.
Artifact: `adapter/` (peft; not for `full`), `model/` (the adapter merged into the de-quantized base:
the function that was trained, in fp32), `logs/metrics.csv`.
The algorithm (model preparation, the Lightning module, merging) is in `teachers/finetune.py`.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L

from compress import training
from compress.artifact import Artifact
from compress.console import say
from compress.data import load_splits
from compress.errors import CompressError, Problem
from compress.measure import carry, evaluate_folder
from compress.records import Record
from compress.validate import schedule_problems
from teachers import finetune, loading

NAME = "finetune_teacher"
CONSUMES = ("teacher",)
PRODUCES = ("teacher",)
KEYS = ("teacher", "data", "finetune", "trainer", "run.seed")
SUMMARY = "QLoRA / LoRA / full fine-tuning of the teacher (Lightning); adapter + merged teacher, evaluated"


def check(cfg) -> list[Problem]:
    """The `finetune` section and the teacher's fine-tuning method."""
    t, problems = cfg.teacher, schedule_problems(cfg, "finetune")
    if t.method not in finetune.METHODS:
        problems.append(Problem("teacher.method", t.method, f"choose one of: {', '.join(finetune.METHODS)}"))
    if t.lora.r < 1 or t.lora.alpha <= 0:
        problems.append(Problem("teacher.lora.r", t.lora.r, "r must be >= 1 and alpha > 0"))
    if not 0 <= t.lora.dropout < 1:
        problems.append(Problem("teacher.lora.dropout", t.lora.dropout, "must be in [0, 1)"))
    if t.quant.quant_type not in ("nf4", "fp4"):
        problems.append(Problem("teacher.quant.quant_type", t.quant.quant_type, "choose nf4 or fp4"))
    if t.quant.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(Problem("teacher.quant.compute_dtype", t.quant.compute_dtype,
                                "choose auto, float32, bfloat16 or float16"))
    return problems


def preflight(cfg) -> list[Problem]:
    """In the pipeline: QLoRA needs bitsandbytes 4-bit on this device."""
    if cfg.teacher.method != "qlora":
        return []
    try:
        finetune.check_4bit(loading.pick_device(cfg.teacher.device))
    except CompressError as e:
        return e.problems
    return []


def run(cfg, src: Artifact, out: Path) -> dict:
    L.seed_everything(cfg.run.seed, workers=True)
    splits = load_splits(cfg.data)
    if not (splits.labelled or splits.generative):
        raise CompressError(Problem("data", cfg.data.name, "finetune_teacher needs labelled data or answers; "
                                    "data=text has no labels: use pipeline=evaluate"))
    base_dir = Path(src.teacher()["path"])
    model, tok = finetune.trainable_model(base_dir, cfg.teacher)
    ocfg = cfg.finetune
    n_val = ocfg.val_size if ocfg.val_every > 0 else 0
    answers = [splits.answer(e) for e in splits.train]
    items = training.encode_examples(tok, cfg.data, [e.text for e in splits.train], answers, ocfg.max_length)
    train_items, val_items = items[n_val:], items[:n_val]
    # bf16 autocast on a CPU with AMX / AVX512-BF16 (with eager attention: 1.4x faster QLoRA steps; README)
    trainer = training.make_trainer(cfg.trainer, ocfg, out, has_val=bool(val_items), cpu_bf16=True)
    training.train_attention(model, cfg.teacher, trainer)
    say(f"  fine-tuning {cfg.teacher.name} with {cfg.teacher.method} for {ocfg.max_steps} steps "
        f"({len(train_items)} train examples)")
    module = finetune.FinetuneModule(model, ocfg)
    trainer.fit(module, training.step_loader(train_items, ocfg.batch_size, tok.pad_token_id, cfg.run.seed, trainer),
                training.loader(val_items, ocfg.batch_size, tok.pad_token_id, False) if val_items else None,
                ckpt_path=training.last_checkpoint(out))
    if not trainer.is_global_zero:  # other ranks only train; rank 0 writes the artifact
        return {}
    if cfg.teacher.method == "full":
        model.save_pretrained(out / "model", safe_serialization=True)
    else:
        model.save_pretrained(out / "adapter")
        finetune.merged_teacher(base_dir, out / "adapter", cfg.teacher, out / "model")
    tok.save_pretrained(out / "model")
    del model, module, trainer
    return measure(cfg, src, out, splits)


def measure(cfg, src: Artifact, out: Path, splits) -> dict:
    """Measure `out/model` as the new reference teacher; agreement_base is agreement with the base teacher."""
    base = src.teacher()
    measured = evaluate_folder(out / "model", cfg.teacher, "teacher", splits, cfg, base.get("predictions"))
    preds = measured.pop("predictions", None)
    measured["agreement_base"] = measured.pop("agreement", None)
    record = Record.of(NAME, "teacher", cfg.teacher.name, measured, path=str(out / "model"),
                       variant=cfg.teacher.method, agreement=1.0 if preds is not None else None)
    teacher = {"path": out / "model", "name": cfg.teacher.name, "variant": cfg.teacher.method,
               "accuracy": measured.get("accuracy"), "base_accuracy": base.get("base_accuracy"), "predictions": preds}
    return {"records": [record.to_dict()], "roles": carry(src, out, teacher=teacher)}


def reevaluate(cfg, src: Artifact, path: Path) -> dict:
    """Measure the finished stage's merged teacher again (the evaluation settings changed)."""
    return measure(cfg, src, path, load_splits(cfg.data))
