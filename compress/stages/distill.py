"""Stage `distill`: the student learns from the reference teacher, in a Lightning module.

Consumes: the teacher. Produces: the student (`model/`); the teacher is handed on.
The student starts as `student` describes it (by default cut from the current, i.e. fine-tuned,
teacher's layers). It trains on the teacher's pseudo-labels for the `unlabeled` split (and the gold
labels of `train` when `distill.hard_weight > 0`) with the loss of `students/distill.py`:
    soft_weight * KD_T + pseudo_weight * CE(pseudo) + hard_weight * CE(gold) + hidden_weight * (1 - cos)
Artifact: `model/`, `pseudo_labels.jsonl`, `teacher_topk.safetensors` (with `distill.topk_cache`; on a label
task with `soft_on=answer`, `teacher_answer_topk.safetensors`, read off the pseudo-labelling pass, which then
also keeps the teacher's hidden states on each prompt, in memory, for the hidden-state term),
`logs/metrics.csv`. Pseudo-labels are also cached in `<run>/cache/`, so a rerun with other loss
settings reuses them.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lightning as L
import torch

from compress import training
from compress.artifact import Artifact
from compress.console import say
from compress.data import Example, load_splits
from compress.errors import CompressError, Problem, raise_if
from compress.evaluate import eos_ids
from compress.hub import text_hash
from compress.measure import carry, measure_student
from compress.validate import schedule_problems
from students import build as student_build
from students import distill, quant_aware
from teachers import loading

NAME = "distill"
CONSUMES = ("teacher",)
PRODUCES = ("student",)
KEYS = ("teacher", "student", "data", "distill", "trainer", "run.seed")
SUMMARY = "soft-label + pseudo-label distillation into the student (Lightning), evaluated"


def check(cfg) -> list[Problem]:
    """The `distill` section: schedule, loss weights, divergence, top-K cache."""
    d, problems = cfg.distill, schedule_problems(cfg, "distill")
    if d.pseudo_batch_size < 1:
        problems.append(Problem("distill.pseudo_batch_size", d.pseudo_batch_size, "must be >= 1 (prompts per "
                                "teacher forward in the pseudo-labelling pass, e.g. 32)"))
    if not d.temperature > 0:
        problems.append(Problem("distill.temperature", d.temperature, "must be > 0 (1 = the plain distribution, "
                                "2 is a common choice)"))
    weights = {k: d[k] for k in ("soft_weight", "pseudo_weight", "hard_weight", "hidden_weight")}
    problems += [Problem(f"distill.{k}", v, "must be >= 0") for k, v in weights.items() if v < 0]
    if all(v == 0 for v in weights.values()):
        problems.append(Problem("distill.soft_weight", 0, "soft_weight, pseudo_weight, hard_weight and hidden_weight "
                                "are all 0, so the student would learn nothing; set at least one > 0"))
    if d.divergence not in distill.DIVERGENCES:
        problems.append(Problem("distill.divergence", d.divergence,
                                f"choose one of: {', '.join(distill.DIVERGENCES)}"))
    if not 0 < d.jsd_beta < 1:
        problems.append(Problem("distill.jsd_beta", d.jsd_beta, "must be in (0, 1)"))
    if d.soft_on not in ("all", "answer"):
        problems.append(Problem("distill.soft_on", d.soft_on, "choose all or answer"))
    if not 0 <= d.on_policy_ratio <= 1:
        problems.append(Problem("distill.on_policy_ratio", d.on_policy_ratio, "must be in [0, 1] (the fraction of "
                                "batches the student answers itself; 0 = off)"))
    elif d.on_policy_ratio > 0 and d.soft_weight <= 0:
        problems.append(Problem("distill.on_policy_ratio", d.on_policy_ratio, "on-policy batches train the soft "
                                "term only, and distill.soft_weight is 0; set soft_weight > 0 or on_policy_ratio=0"))
    elif d.on_policy_ratio > 0 and d.topk_cache > 0:
        problems.append(Problem("distill.on_policy_ratio", d.on_policy_ratio, "the teacher must score the "
                                "student's own answers on the fly; set distill.topk_cache=0 or on_policy_ratio=0"))
    if not d.on_policy_temperature > 0:
        problems.append(Problem("distill.on_policy_temperature", d.on_policy_temperature, "must be > 0 (1 samples "
                                "the student's plain distribution)"))
    problems += quant_aware_problems(cfg, d)
    if d.topk_cache < 0:
        problems.append(Problem("distill.topk_cache", d.topk_cache, "must be >= 0 (0 = teacher on the fly)"))
    elif d.topk_cache > 0 and d.divergence != "forward_kl":
        problems.append(Problem("distill.topk_cache", d.topk_cache, "the top-K cache supports "
                                "distill.divergence=forward_kl only; set topk_cache=0 for reverse_kl or jsd"))
    if d.topk_cache > 0 and d.hidden_weight > 0 and not answer_cache(d):
        problems.append(Problem("distill.topk_cache", d.topk_cache, "hidden-state distillation needs the teacher's "
                                "activations, which only the answer cache keeps (distill.soft_on=answer, "
                                "hard_weight=0); set those, or topk_cache=0 (the teacher runs in every step), or "
                                "hidden_weight=0"))
    return problems


def quant_aware_problems(cfg, d) -> list[Problem]:
    """`distill.quant_aware_steps` within the schedule, its block a size MatMulNBits has, and the same
    block as the export's int4 variant (else the student would train through other weights)."""
    n, block, problems = d.quant_aware_steps, d.quant_aware_block_size, []
    if n < 0:
        problems.append(Problem("distill.quant_aware_steps", n, "must be >= 0 (the last N steps, at most "
                                "distill.max_steps, train through the int4 weights; 0 = off)"))
    if n > 0 and cfg.trainer.strategy in ("fsdp", "deepspeed"):
        problems.append(Problem("distill.quant_aware_steps", n, f"the weights are rounded module by module, which "
                                f"trainer.strategy={cfg.trainer.strategy} (sharded, flattened parameters) does not "
                                "allow; use trainer.strategy=ddp or auto, or quant_aware_steps=0"))
    if block < 16 or block & (block - 1):
        problems.append(Problem("distill.quant_aware_block_size", block, "must be a power of 2, >= 16"))
    elif n > 0 and "export" in cfg.pipeline.stages and "int4" in cfg.export.variants \
            and block != cfg.export.int4_block_size:
        problems.append(Problem("distill.quant_aware_block_size", block, "the student would train through other "
                                f"weights than its int4 export writes (export.int4_block_size="
                                f"{cfg.export.int4_block_size}); set both to the same size"))
    return problems


def answer_cache(d) -> bool:
    """Settings under which, on a label task, the top-K cache is read off the pseudo-labelling pass."""
    return d.topk_cache > 0 and d.soft_weight > 0 and d.soft_on == "answer" and d.hard_weight == 0


def preflight(cfg) -> list[Problem]:
    """In the pipeline (fail now, not after hours of earlier stages): inputs the teacher writes need a task
    with shared labels; a student of its own must share the teacher's vocabulary for soft labels."""
    if cfg.data.synthetic_unlabeled > 0 and (problems := written_input_problems(cfg.data, load_splits(cfg.data))):
        return problems
    if cfg.distill.soft_weight <= 0 or not (cfg.student.path or cfg.student.random):
        return []
    t = loading.load_tokenizer(loading.resolve(cfg.teacher, "teacher"), cfg.teacher, "teacher")
    s = loading.load_tokenizer(loading.resolve(cfg.student, "student"), cfg.student, "student")
    try:
        distill.check_tokenizers(t, s, cfg.distill.soft_weight)
    except CompressError as e:
        return e.problems
    return []


def run(cfg, src: Artifact, out: Path) -> dict:
    splits = load_splits(cfg.data)
    teacher = src.teacher()
    init = out / "student_init" if cfg.student.from_teacher and not cfg.student.path else None
    student_dir = student_build.resolve(cfg.student, Path(teacher["path"]), dest=init, data=cfg.data,
                                         splits=splits)
    info = train(cfg, cfg.distill, Path(teacher["path"]), student_dir, splits, out)
    if info is None:  # ranks > 0 only train
        return {}
    if init is not None:
        shutil.rmtree(init, ignore_errors=True)
    record = measure_student(cfg, NAME, out / "model", splits, teacher)
    return {"records": [record.to_dict()], "roles": carry(src, out, student={"path": out / "model",
                                                                            "name": cfg.student.name}), **info}


def reevaluate(cfg, src: Artifact, path: Path) -> dict:
    """Measure the finished stage's student again (the evaluation settings changed)."""
    return {"records": [measure_student(cfg, NAME, path / "model", load_splits(cfg.data), src.teacher()).to_dict()]}


def train(cfg, d, teacher_dir: Path, student_dir: Path, splits, out: Path) -> dict | None:
    """Distil the teacher in `teacher_dir` into the student in `student_dir` with the loss settings `d`
    (`cfg.distill`, or prune's recovery schedule); save the result to `out/model`. Returns what it
    trained on; None on ranks > 0, which only join the fit."""
    L.seed_everything(cfg.run.seed, workers=True)
    teacher, t_tok = loading.load(teacher_dir, cfg.teacher, "teacher")
    student, s_tok = loading.load(student_dir, cfg.student, "student")
    distill.check_tokenizers(t_tok, s_tok, d.soft_weight)
    if cfg.data.synthetic_unlabeled > 0 and (d.pseudo_weight > 0 or d.soft_weight > 0):
        splits = with_written_inputs(teacher, t_tok, teacher_dir, splits, cfg, out)
    soft_k = d.topk_cache if answer_soft_labels(d, splits) else 0
    on_the_fly = d.topk_cache > 0 and d.hidden_weight > 0 and not soft_k
    if on_the_fly:  # e.g. the default preset on a generative task
        say("  distill.topk_cache: the teacher's hidden states come with its answers on label tasks only; "
            "here it runs in every step")
    layers = distill.layer_map(student.config, teacher.config, d.hidden_weight) if soft_k else []
    if layers:  # the hidden-state term reads the teacher's states kept from the pseudo-labelling pass
        raise_if(hidden_cache_problems(t_tok, splits, cfg, d, layers, student.config.hidden_size),
                 "the teacher's hidden states do not fit in memory")
    answers, answer_topk, hidden = pseudo_labels(teacher, t_tok, teacher_dir, splits, cfg, out, soft_k, layers)

    texts, targets, kinds = [], [], []
    if d.hard_weight > 0:
        texts += [e.text for e in splits.train]
        targets += [splits.answer(e) for e in splits.train]
        kinds += [0] * len(splits.train)
    if d.pseudo_weight > 0 or d.soft_weight > 0:
        texts += [e.text for e in splits.unlabeled]
        targets += answers
        kinds += [1] * len(splits.unlabeled)
    if not texts:
        raise CompressError(Problem("data.unlabeled_size", cfg.data.unlabeled_size, "distill has no examples to "
                                    "train on: raise data.unlabeled_size (or data.train_size with hard_weight > 0)"))
    items = training.encode_examples(s_tok, cfg.data, texts, targets, d.max_length, kinds)
    for i, it in enumerate(items):
        it["index"] = i
    n_val = min(d.val_size, len(items) // 5) if d.val_every > 0 else 0
    topk = teacher_hidden = None
    if answer_topk is not None:  # the soft labels came with the pseudo-labels: item i is unlabeled example i
        topk, teacher = distill.expand_answer_topk(answer_topk, items), None
        if hidden is not None:
            teacher_hidden = {"layers": layers, "states": distill.hidden_states_on_prompts(hidden, items)}
    elif d.topk_cache > 0 and d.soft_weight > 0 and not on_the_fly:
        topk = topk_cache(teacher, items, d, cfg.eval.batch_size, s_tok.pad_token_id, out)
        teacher = None  # training reads the cache only
    student.config.use_cache = False
    if d.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    module = distill.DistillModule(student.train(), teacher, d, topk, s_tok.pad_token_id,
                                   eos_ids(s_tok, student.generation_config), teacher_hidden)
    # bf16 autocast on a CPU with AMX / AVX512-BF16: 1.7x faster steps, same accuracy (README, measured)
    trainer = training.make_trainer(cfg.trainer, d, out, has_val=n_val > 0, cpu_bf16=True)
    training.train_attention(student, cfg.student, trainer)
    n_all = sum(p.numel() for p in student.parameters()) / 1e6
    n_trained = sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6
    if d.quant_aware_steps > 0 and not ("export" in cfg.pipeline.stages and "int4" in cfg.export.variants):
        say(f"  [yellow]distill.quant_aware_steps={d.quant_aware_steps} trains through int4 weights, but this "
            "pipeline exports no int4 form: set distill.quant_aware_steps=0 to keep full-precision weights")
    say(f"  distilling into {cfg.student.name} ({n_all:.1f} M params, {n_trained:.1f} M trained) for "
        f"{d.max_steps} steps on {len(items) - n_val} examples")
    trainer.fit(module, training.step_loader(items[n_val:], d.batch_size, s_tok.pad_token_id, cfg.run.seed, trainer),
                training.loader(items[:n_val], d.batch_size, s_tok.pad_token_id, False) if n_val else None,
                ckpt_path=training.last_checkpoint(out))
    if not trainer.is_global_zero:  # other ranks only train; rank 0 writes the artifact
        return None
    if quant_aware.bake(student):
        say(f"  quantization-aware: the student's last {min(d.quant_aware_steps, d.max_steps)} steps trained "
            f"through int4 weights "
            f"(block {d.quant_aware_block_size}); saved rounded")
    student.config.use_cache = True
    student.save_pretrained(out / "model", safe_serialization=True)
    s_tok.save_pretrained(out / "model")
    return {"pseudo_labels": len(answers), "train_items": len(items) - n_val,
            "written_inputs": sum(1 for e in splits.unlabeled if e.group == WRITTEN),
            "topk_bytes_per_token": distill.topk_bytes_per_token(d.topk_cache) if topk is not None else None}


def answer_soft_labels(d, splits) -> bool:
    """Whether the top-K cache comes with the pseudo-labels (one teacher pass instead of two): a label
    task, soft labels on the answer only, trained on the teacher's answers alone (no gold items, whose
    answers the teacher does not score)."""
    return answer_cache(d) and splits.labelled and not splits.generative


def topk_cache(teacher, items: list[dict], d, batch_size: int, pad_id: int, out: Path) -> dict:
    """The teacher's top-K log-probs for every training item: `out/teacher_topk.safetensors`, built once
    (a resumed stage reads it back)."""
    from safetensors.torch import load_file

    path = out / "teacher_topk.safetensors"
    if path.exists():
        return load_file(path)
    return distill.build_topk_cache(teacher, items, d.topk_cache, d.temperature, batch_size, pad_id, out)


WRITTEN = "written by the teacher"
"""The group of every input the teacher wrote (`data.synthetic_unlabeled`)."""


def written_input_problems(data, splits) -> list[Problem]:
    """Why the teacher cannot write inputs for this task: examples with their own choices (a written
    input would have none), or no real input to show it."""
    n, real = data.synthetic_unlabeled, splits.train + splits.unlabeled
    if any(e.choices is not None for e in real):
        return [Problem("data.synthetic_unlabeled", n, "this task's examples have their own choices, which an input "
                        "the teacher writes would lack; set data.synthetic_unlabeled=0")]
    if not real:
        return [Problem("data.synthetic_unlabeled", n, "the teacher writes new inputs from real ones, and train "
                        "and unlabeled are empty; set data.unlabeled_size > 0")]
    return []


def with_written_inputs(teacher, tok, teacher_dir: Path, splits, cfg, out: Path):
    """`splits` with `data.synthetic_unlabeled` inputs written by the teacher added to `unlabeled`
    (teachers/synthetic.py), written to `out/written_inputs.jsonl`.

    A copy is kept in the run's `cache/`, keyed by the teacher folder, the real inputs, the eval inputs,
    the count and `data.seed`: a rerun, the recovery after pruning and other `run.seed`s reuse them."""
    from dataclasses import replace

    from compress.runtime import truncate
    from teachers import synthetic

    n = cfg.data.synthetic_unlabeled
    raise_if(written_input_problems(cfg.data, splits), "the teacher cannot write inputs for this task")
    pool = [truncate(e.text, cfg.data.max_chars) for e in splits.train + splits.unlabeled]
    avoid = [e.text for e in splits.eval]
    bf16 = training.precision(cfg.trainer, cpu_bf16=True).startswith("bf16")
    key = text_hash(json.dumps([loading.folder_fingerprint(teacher_dir), pool, avoid, n, cfg.data.seed, bf16,
                                synthetic.SHOTS, synthetic.SEPARATORS, synthetic.TEMPERATURE, synthetic.TOP_P]))[:16]
    cached = out.parent / "cache" / f"written_inputs-{key}.jsonl"
    if cached.exists():
        texts = [json.loads(line)["text"] for line in cached.read_text().splitlines()]
        say(f"  written inputs: reused {len(texts)} from {cached}")
    else:
        device = next(teacher.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            texts, counts = synthetic.write_inputs(teacher, tok, pool, avoid, n, cfg.data.seed,
                                                   eos_ids(tok, teacher.generation_config))
        say(f"  written inputs: kept {len(texts)} of {sum(counts.values())} the teacher wrote ("
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")")
        if len(texts) < n:
            say(f"  [yellow]written inputs: {len(texts)}, fewer than data.synthetic_unlabeled={n}: the teacher "
                "mostly copied, repeated or ran over its token budget[/yellow]")
        cached.parent.mkdir(exist_ok=True)
        tmp = cached.with_suffix(".part")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.rename(cached)
    if not (out / "written_inputs.jsonl").exists():
        shutil.copy2(cached, out / "written_inputs.jsonl")
    written = [Example(t, group=WRITTEN) for t in texts]
    return replace(splits, unlabeled=splits.unlabeled + written)


def pseudo_labels(teacher, tok, teacher_dir: Path, splits, cfg, out: Path, soft_k: int = 0,
                  hidden_layers: list[int] | None = None) -> tuple[list[str], dict | None, list | None]:
    """The teacher's answers for the `unlabeled` split, written to `out/pseudo_labels.jsonl`; with
    `soft_k` > 0 also its top-K log-probs on each answer token (`out/teacher_answer_topk.safetensors`),
    and with `hidden_layers` its hidden states on each example (`distill.teacher_answers`; held in
    memory only, so the teacher runs again whenever they are asked for).

    A copy is kept in the run's `cache/` folder, keyed by the teacher folder, the texts, the prompt, the
    verbalizers (and each example's own choices, if any) and the precision (and K and the temperature of
    the top-K file), so a rerun of this stage (other weights, steps) or the recovery after pruning reuses
    them. When distillation trains in bf16, the teacher labels with its weights cast to bf16 (not under
    autocast, whose casts of every activation were a fifth of the pass): on 2 cores of a CPU with AMX, 800
    reviews took 16.6 s against 21.1 s under autocast and 57.4 s in fp32 (batch 32), and 796 of the 800 labels
    equalled fp32's (797 under autocast).
    """
    from safetensors.torch import load_file, save_file

    bf16 = training.precision(cfg.trainer, cpu_bf16=True).startswith("bf16")
    parts = [loading.folder_fingerprint(teacher_dir), [e.text for e in splits.unlabeled], splits.verbalizers,
             cfg.distill.pseudo_max_new_tokens, "bf16 weights" if bf16 else False,
             [cfg.data.instruction, cfg.data.answer_prefix, cfg.data.use_chat_template]]  # the prompt answered
    if any(e.choices is not None for e in splits.unlabeled):
        parts.append([e.choices for e in splits.unlabeled])
    key = text_hash(json.dumps(parts))[:16]
    cached = out.parent / "cache" / f"pseudo_labels-{key}.jsonl"
    cached_topk = cached.with_name(f"answer_topk-{key}-k{soft_k}-t{cfg.distill.temperature}.safetensors")
    if cached.exists() and (not soft_k or cached_topk.exists()) and not hidden_layers:
        for src, name in ((cached, "pseudo_labels.jsonl"), (cached_topk, "teacher_answer_topk.safetensors")):
            if src.exists() and not (out / name).exists():  # a resumed stage (or another rank) has it already
                shutil.copy2(src, out / name)
        rows = [json.loads(line) for line in cached.read_text().splitlines()]
        say(f"  pseudo-labels: reused {len(rows)} from {cached}" + (" (with the teacher's top-K)" if soft_k else ""))
        return [r["answer"] for r in rows], load_file(cached_topk) if soft_k else None, None
    texts = [e.text for e in splits.unlabeled]
    t0 = time.perf_counter()
    with training.cast_weights(teacher, torch.bfloat16 if bf16 else None):
        answers, answer_topk, hidden = distill.teacher_answers(teacher, tok, splits.unlabeled, splits, cfg, soft_k,
                                                               hidden_layers)
    kept = [w for w, on in (("its top-K", answer_topk is not None), ("hidden states", hidden is not None)) if on]
    say(f"  pseudo-labels: {len(answers)} from the teacher in {time.perf_counter() - t0:.0f} s"
        + (f" (with {' and '.join(kept)})" if kept else ""))
    with open(out / "pseudo_labels.jsonl", "w") as f:
        for t, a in zip(texts, answers):
            f.write(json.dumps({"text": t, "answer": a}) + "\n")
    cached.parent.mkdir(exist_ok=True)
    if answer_topk is not None:
        save_file(answer_topk, out / "teacher_answer_topk.safetensors")
        shutil.copy2(out / "teacher_answer_topk.safetensors", cached_topk.with_suffix(".part"))
        cached_topk.with_suffix(".part").rename(cached_topk)
    shutil.copy2(out / "pseudo_labels.jsonl", cached.with_suffix(".part"))
    cached.with_suffix(".part").rename(cached)  # last: a cached jsonl means its top-K file is there too
    return answers, answer_topk, hidden


def hidden_cache_problems(tok, splits, cfg, d, layers: list[int], width: int) -> list[Problem]:
    """The teacher's hidden states on every unlabeled prompt are held in host memory during training: refuse
    (before the teacher runs) when they would take more than half of the memory available now."""
    need = distill.hidden_cache_bytes(tok, splits.unlabeled, cfg, layers, width)
    free = available_memory_bytes()
    if free is None or need <= free / 2:
        return []
    return [Problem("distill.topk_cache", d.topk_cache, f"the teacher's hidden states on {len(splits.unlabeled)} "
                    f"prompts at {len(layers)} layers take {need / 2**30:.1f} GiB, more than half of the "
                    f"{free / 2**30:.1f} GiB available; set distill.topk_cache=0 (the teacher runs in every step), "
                    "distill.hidden_weight=0, or a smaller data.unlabeled_size")]


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
