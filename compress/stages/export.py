"""Stage `export`: the input model to ONNX, checked against PyTorch, plus int8/int4 CPU variants.

1. onnxruntime-genai's model builder (or optimum's `text-generation-with-past`, `export.exporter`) exports the
   model, KV cache in and out, to `onnx/`.
2. Parity: the eval split's first prompts run through PyTorch and the ONNX fp32 session; the
   stage fails (exit 2, with the figures) when max |logit difference| or top-1 agreement miss
   `export.max_abs_diff` / `export.min_top1`.
3. Variants: `onnx-int8/` (ONNX Runtime dynamic quantization: int8 weights, per channel,
   activations quantized on the fly) and `onnx-int4/` (4-bit weight-only MatMulNBits).
4. Every variant is evaluated through onnxruntime (compress/ort.py) with the spine's evaluator;
   PyTorch fp32 decode speed is measured in the same process so each record carries a ratio.
5. The task travels with the model: each folder gets `task.json` (the prompt around the input, the chat
   template already rendered, labels and their continuations, generation settings, the metric),
   `predict.py` (compress/runtime.py: onnxruntime, tokenizers and numpy only, scoring as step 4 did) and
   a README that shows both; the stage's `predictions.json` holds each variant's eval predictions.

Consumes: the student (the input's student role: distilled, pruned, the unquantized input of GPTQ, or
the configured student after `evaluate`) and the teacher (for agreement). Produces: the ONNX forms
of the student, measured; the roles are handed on unchanged (an ONNX model is not a PyTorch one).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape

from compress import ort, runtime
from compress.artifact import Artifact, write_json
from compress.console import say
from compress.data import load_splits
from compress.errors import CompressError, Problem, raise_if
from compress.evaluate import (build_prompt, count_params, eos_ids, evaluate_fns, latency_prompt, measure_latency, pad,
                               peak_memory, perplexity_blocks, torch_logits_fn, weights_size_mb)
from compress.measure import carry
from compress.records import Record, ratio
from teachers import loading

NAME = "export"
CONSUMES = ("teacher", "student")
PRODUCES: tuple[str, ...] = ()
KEYS = ("teacher", "student", "data", "export", "report.baselines", "run.seed")
SUMMARY = "ONNX export (model builder or optimum) checked against PyTorch, int8/int4 CPU variants, evaluated through onnxruntime"

VARIANTS = ("fp32", "int8", "int4")
FOLDERS = {"fp32": "onnx", "int8": "onnx-int8", "int4": "onnx-int4"}


def preflight(cfg) -> list[Problem]:
    """In the pipeline: the ONNX packages."""
    try:
        ort.require_onnx()
    except CompressError as e:
        return e.problems
    return []


def run(cfg, src: Artifact, out: Path) -> dict:
    e = cfg.export
    splits = load_splits(cfg.data)
    model_dir = Path(src.student()["path"])
    tasks, sources = task_specs(cfg, src, splits)  # a template the runtime cannot reproduce fails here, early
    threads = e.threads or cfg.eval.threads or torch.get_num_threads()
    say(f"  exporting {model_dir} to ONNX (export.exporter={e.exporter})")
    t0 = time.perf_counter()
    exporter, fig, model, tok, prompts = export_checked(model_dir, out / FOLDERS["fp32"], cfg.student, "student", cfg,
                                                        splits, threads)
    timings, parity = {"export_s": time.perf_counter() - t0}, {"fp32": fig}
    say(f"  parity fp32 ({exporter}): max |diff| {fig['max_abs_diff']:.2e}, top-1 {fig['top1']:.4f} "
        f"on {fig['tokens']} tokens")

    for variant in e.variants:
        if variant == "fp32":
            continue
        t0 = time.perf_counter()
        quantize(variant, out / FOLDERS["fp32"], out / FOLDERS[variant], e)
        timings[f"{variant}_s"] = time.perf_counter() - t0
        lm = ort.OnnxLM.open(out / FOLDERS[variant], threads, e.graph_optimization)
        parity[variant] = compare(torch_logits_fn(model), ort.logits_fn(lm), prompts, tok.pad_token_id)
        del lm

    if cfg.report.baselines:
        parity.update(export_baselines(cfg, src, out, splits, threads))
    metrics = measure(cfg, src, out, model, tok, parity, threads)
    write_json(out / "parity.json", parity)
    write_tasks(cfg, splits, metrics["records"], parity, threads, tasks, sources)
    return {**metrics, "parity": parity, "source": str(model_dir), "timings": timings, "exporter": exporter}


def reevaluate(cfg, src: Artifact, path: Path) -> dict:
    """Measure the finished stage's ONNX models again (the evaluation settings changed), and write each
    folder's task.json, predict.py and README again (generation settings and figures may have changed)."""
    model_dir = Path(src.student()["path"])
    model, tok = loading.load(model_dir, _cpu(cfg.student), "student")
    parity = json.loads((path / "parity.json").read_text())
    threads = cfg.export.threads or cfg.eval.threads or torch.get_num_threads()
    splits = load_splits(cfg.data)
    tasks, sources = task_specs(cfg, src, splits)
    metrics = measure(cfg, src, path, model, tok, parity, threads)
    write_tasks(cfg, splits, metrics["records"], parity, threads, tasks, sources)
    return metrics


def measure(cfg, src: Artifact, out: Path, model, tok, parity: dict, threads: int) -> dict:
    """One record per ONNX variant, measured through onnxruntime, with its decode speed relative
    to the same model in PyTorch fp32 measured here, in this process; each variant's eval predictions
    go to `predictions.json` (with the gold labels, as the evaluate stage writes them)."""
    splits = load_splits(cfg.data)
    torch_latency = _torch_latency(model, tok, splits, cfg) if cfg.eval.latency else {}
    params = count_params(model)
    del model
    teacher = src.teacher()
    records, predictions = [], {"labels": [e.label for e in splits.eval]}
    if splits.generative:
        predictions["references"] = [list(e.answers) for e in splits.eval]
    for variant in cfg.export.variants:
        folder = out / FOLDERS[variant]
        measured = evaluate_onnx(folder, tok, splits, cfg, teacher.get("predictions"), f"onnx-{variant}", threads)
        predictions[f"onnx-{variant}"] = measured.get("predictions")
        records.append(Record.of(NAME, "student", cfg.student.name, measured, backend="onnxruntime",
                                 variant=f"onnx-{variant}", path=str(folder), params=params,
                                 decode_vs_torch=ratio(measured.get("decode_tok_s"), torch_latency.get("decode_tok_s")),
                                 parity_top1=parity[variant]["top1"],
                                 parity_max_abs_diff=parity[variant]["max_abs_diff"]).to_dict())
    if cfg.report.baselines and "teacher-fp32" in parity and (out / BASELINES["fp32"]).is_dir():
        records += measure_baselines(cfg, src, out, splits, parity, threads)
    write_json(out / "predictions.json", predictions)
    return {"records": records, "torch_fp32_latency": torch_latency, "threads": threads,
            "roles": carry(src, out)}


def _cpu(model_cfg):
    """The student's load settings, but fp32 on the CPU: what the ONNX export is compared with."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(model_cfg, {"dtype": "float32", "device": "cpu"})


def check(cfg) -> list[Problem]:
    """The `export` section."""
    e, problems = cfg.export, []
    bad = [v for v in e.variants if v not in VARIANTS]
    if bad or "fp32" not in e.variants:
        problems.append(Problem("export.variants", list(e.variants), f"choose from {', '.join(VARIANTS)}; fp32 is "
                                "always exported and must be listed"))
    if e.exporter not in EXPORTERS:
        problems.append(Problem("export.exporter", e.exporter, f"choose one of: {', '.join(EXPORTERS)}"))
    if e.graph_optimization not in ort.GRAPH_LEVELS:
        problems.append(Problem("export.graph_optimization", e.graph_optimization,
                                f"choose one of: {', '.join(ort.GRAPH_LEVELS)}"))
    if e.max_abs_diff < 0:
        problems.append(Problem("export.max_abs_diff", e.max_abs_diff, "must be >= 0"))
    if not 0 <= e.min_top1 <= 1:
        problems.append(Problem("export.min_top1", e.min_top1, "must be in [0, 1]"))
    if e.parity_prompts < 1:
        problems.append(Problem("export.parity_prompts", e.parity_prompts, "must be >= 1"))
    if e.threads is not None and e.threads < 1:
        problems.append(Problem("export.threads", e.threads, "must be >= 1, or null"))
    if e.int4_block_size < 16 or e.int4_block_size & (e.int4_block_size - 1):
        problems.append(Problem("export.int4_block_size", e.int4_block_size, "must be a power of 2, >= 16"))
    if e.int4_accuracy_level not in (0, 1, 2, 3, 4):
        problems.append(Problem("export.int4_accuracy_level", e.int4_accuracy_level, "choose 0, 1, 2, 3 or 4"))
    return problems


# --------------------------------------------------------------------------- export and parity


EXPORTERS = ("auto", "builder", "optimum")


def export_onnx(model_dir: Path, dest: Path, exporter: str = "auto") -> str:
    """The model in `model_dir` to `dest/model.onnx` with its KV cache, the tokenizer and config beside it;
    returns the exporter that wrote it. `auto` is onnxruntime-genai's model builder where it knows the
    architecture, else optimum."""
    if exporter != "optimum":
        try:
            build_onnx(model_dir, dest)
            return "builder"
        except Exception as err:  # an architecture it does not know (NotImplementedError), or one it fails on
            shutil.rmtree(dest, ignore_errors=True)
            why = f"{type(err).__name__}: {str(err)[:300]}"
            if exporter == "builder":
                raise CompressError(Problem("export.exporter", exporter, f"onnxruntime-genai's model builder cannot "
                                            f"export {model_dir} ({why}); set export.exporter=optimum or auto")) from None
            say(f"  the model builder cannot export this model ({escape(why)}); exporting with optimum")
    optimum_onnx(model_dir, dest)
    return "optimum"


def export_checked(model_dir: Path, dest: Path, model_cfg, role: str, cfg, splits, threads: int):
    """export_onnx, then the fp32 graph against the PyTorch model on the parity prompts (`compare`); returns
    (exporter, parity figures, model, tokenizer, prompts). Under `auto`, a builder graph that misses the
    tolerance is exported again by optimum and checked in turn, so a family the builder gets wrong still
    exports; a graph that misses it stops the stage (exit 2). The model loads after the export, so the two never
    hold the weights at once."""
    e = cfg.export
    used = export_onnx(model_dir, dest, e.exporter)
    model, tok = loading.load(model_dir, _cpu(model_cfg), role)
    prompts = parity_prompts(tok, splits, cfg.data, e.parity_prompts)

    def parity() -> dict:
        lm = ort.OnnxLM.open(dest, threads, e.graph_optimization)
        return compare(torch_logits_fn(model), ort.logits_fn(lm), prompts, tok.pad_token_id)

    fig = parity()
    if used == "builder" and e.exporter == "auto" and parity_problems(fig, e):
        say(f"  the model builder's graph misses parity (max |diff| {fig['max_abs_diff']:.2e}, top-1 "
            f"{fig['top1']:.4f}); exporting with optimum")
        used = export_onnx(model_dir, dest, "optimum")
        fig = parity()
    raise_if(parity_problems(fig, e), "export parity check failed")
    return used, fig, model, tok, prompts


def build_onnx(model_dir: Path, dest: Path) -> None:
    """onnxruntime-genai's model builder, fp32 for the CPU: one fused node per attention (GroupQueryAttention,
    rotary inside), residual adds fused into the norms, q/k/v and gate/up each one MatMul (the speed it buys:
    `export.exporter`). Positions come from the attention mask, so the graph has no `position_ids` input, and a
    padded batch must be right-padded (compress.ort does)."""
    import contextlib
    import io
    import tempfile

    from onnxruntime_genai.models.builder import create_model

    shutil.rmtree(dest, ignore_errors=True)
    log = io.StringIO()  # its per-layer prints and per-tensor progress bars
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        create_model(str(model_dir), str(model_dir), str(dest), "fp32", "cpu", cache, hf_remote=False,
                     hf_token="false")
    for name in ("config.json", "generation_config.json"):  # what optimum writes too; the builder does not
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)


def optimum_onnx(model_dir: Path, dest: Path) -> None:
    """optimum's export with KV cache (`text-generation-with-past`); the tokenizer and config are written beside
    model.onnx."""
    import warnings

    from optimum.exporters.onnx import main_export

    logging.getLogger("optimum").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent branches, traced as intended
        main_export(str(model_dir), str(dest), task="text-generation-with-past", do_validation=False,
                    device="cpu", trust_remote_code=False)


def parity_prompts(tok, splits, data_cfg, n: int) -> list[list[int]]:
    """Token ids of the first `n` eval prompts, in the task's prompt format."""
    chat = bool(data_cfg.use_chat_template and getattr(tok, "chat_template", None))
    texts = [build_prompt(tok, ex.text, data_cfg) for ex in splits.eval[:n]]
    return [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]


def compare(reference_fn, candidate_fn, prompts: list[list[int]], pad_id: int, batch_size: int = 4) -> dict:
    """Max |logit difference| and top-1 agreement of two logits functions over every prompt token."""
    worst, same, total = 0.0, 0, 0
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad(prompts[start: start + batch_size], pad_id)  # (B, T)
        a = reference_fn(ids, mask, None).float()  # (B, T, V)
        b = candidate_fn(ids, mask, None).float()
        keep = mask.bool()
        worst = max(worst, (a - b).abs()[keep].max().item())
        same += int((a.argmax(-1) == b.argmax(-1))[keep].sum())
        total += int(keep.sum())
    return {"max_abs_diff": worst, "top1": same / total, "tokens": total, "prompts": len(prompts)}


def parity_problems(fig: dict, e) -> list[Problem]:
    problems = []
    if fig["max_abs_diff"] > e.max_abs_diff:
        problems.append(Problem("export.max_abs_diff", e.max_abs_diff, f"the ONNX fp32 logits differ from PyTorch's "
                                f"by up to {fig['max_abs_diff']:.3g} (top-1 agreement {fig['top1']:.4f} on "
                                f"{fig['tokens']} tokens of {fig['prompts']} prompts); the export is wrong, or "
                                "raise the tolerance if this difference is acceptable"))
    if fig["top1"] < e.min_top1:
        problems.append(Problem("export.min_top1", e.min_top1, f"ONNX fp32 and PyTorch agree on the top-1 token at "
                                f"only {fig['top1']:.4f} of {fig['tokens']} positions (max |logit diff| "
                                f"{fig['max_abs_diff']:.3g})"))
    return problems


# --------------------------------------------------------------------------- int8 / int4


def weight_matmuls(model) -> list[str]:
    """MatMul nodes that multiply by a weight: an initializer, or a Transpose of one (a tied head)."""
    inits = {i.name for i in model.graph.initializer}
    transposed = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and (n.input[1] in inits or
                                                                            n.input[1] in transposed)]


def select_nodes(model, exclude: list[str], key: str) -> list[str]:
    """Weight MatMuls to quantize: all but those whose name contains a pattern of `exclude`."""
    names = weight_matmuls(model)
    raise_if([Problem(key, pat, f"matches no MatMul node with weights; their names look like {names[0]!r} or "
                      f"{names[-1]!r}") for pat in exclude if not any(pat in n for n in names)], "bad quantization targets")
    return [n for n in names if not any(pat in n for pat in exclude)]


def fold_transposed_weights(model, nodes: list[str]) -> None:
    """Make the transposed weight of each selected MatMul (a tied lm_head reads the embedding
    through a Transpose) a constant of its own, so that the quantizers see a weight."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in [n for n in model.graph.node if n.name in set(nodes) and n.input[1] not in inits]:
        t = producer[node.input[1]]
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[t.input[0]])
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), t.output[0]))
        model.graph.node.remove(t)


def quantize(variant: str, src: Path, dest: Path, e) -> None:
    """Write `dest/model.onnx` (int8 or int4 weights) and copy the tokenizer and config from `src`."""
    import onnx

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(src / "model.onnx")
    key = f"export.{variant}_exclude"
    nodes = select_nodes(model, list(e.int8_exclude if variant == "int8" else e.int4_exclude), key)
    fold_transposed_weights(model, nodes)
    shutil.rmtree(dest, ignore_errors=True)  # a resumed stage writes it again
    dest.mkdir(parents=True)
    big = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights go to model.onnx_data
    if variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        say(f"  int8: quantizing {len(nodes)} MatMuls (per channel: {e.int8_per_channel}, "
            f"{7 if e.int8_reduce_range else 8}-bit weights)")
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # "consider pre-processing": a hint for static quantization
        try:
            quantize_dynamic(model, dest / "model.onnx", weight_type=QuantType.QInt8,
                             per_channel=e.int8_per_channel, reduce_range=e.int8_reduce_range,
                             op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=nodes, use_external_data_format=big)
        finally:
            root.setLevel(level)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        say(f"  int4: quantizing {len(nodes)} MatMuls (MatMulNBits, block {e.int4_block_size})")
        q = MatMulNBitsQuantizer(model, bits=4, block_size=e.int4_block_size, is_symmetric=True,
                                 accuracy_level=e.int4_accuracy_level,
                                 nodes_to_exclude=[n.name for n in model.graph.node if n.name not in set(nodes)])
        q.process()
        q.model.save_model_to_file(str(dest / "model.onnx"), use_external_data_format=big)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx") and f.name not in ("README.md", *TASK_FILES):
            shutil.copy2(f, dest / f.name)


# --------------------------------------------------------------------------- evaluation


def timing_prompt(tok, splits, cfg) -> list[int]:
    """The held-out prompt every latency of the run is timed on (compress.evaluate.latency_prompt)."""
    blocks = perplexity_blocks(tok, splits.perplexity, cfg.eval.perplexity_blocks, cfg.eval.perplexity_block_tokens)
    return latency_prompt(tok, blocks, cfg.eval.prefill_tokens)


def _torch_latency(model, tok, splits, cfg) -> dict:
    """PyTorch fp32 prefill and decode of the same model, measured here for the speed ratios."""
    return measure_latency(model, timing_prompt(tok, splits, cfg), cfg.eval.decode_tokens,
                           cfg.eval.warmup_runs, cfg.eval.latency_runs)


def evaluate_onnx(folder: Path, tok, splits, cfg, reference, name: str, threads: int) -> dict:
    """Accuracy, agreement, perplexity and latency through onnxruntime sessions, plus memory and size: scored
    with the head only where scoring reads it (`ort.gathered_graph`), timed on the folder's graph as deployed."""
    t0 = time.perf_counter()
    with peak_memory(torch.device("cpu")) as mem:
        scorer = ort.OnnxLM.open(folder, threads, cfg.export.graph_optimization, gather=True)
        record = evaluate_fns(ort.logits_fn(scorer), None, tok, splits, cfg.data, cfg.eval, reference, name,
                              ort.generate_fn(scorer, eos_ids(tok, model_eos(folder))))
        del scorer
        if cfg.eval.latency:
            lm = ort.OnnxLM.open(folder, threads, cfg.export.graph_optimization)
            record.update(ort.measure_latency(lm, timing_prompt(tok, splits, cfg), cfg.eval.decode_tokens,
                                              cfg.eval.warmup_runs, cfg.eval.latency_runs))
            del lm
    record.update(peak_mem_mb=mem["peak_mem_mb"], size_mb=weights_size_mb(folder), eval_s=time.perf_counter() - t0)
    return record


# --------------------------------------------------------------------------- the task, predict.py, README


TASK_FILES = (runtime.TASK_FILE, "predict.py")
"""What write_task puts beside model.onnx (README.md too)."""
SENTINEL = "\ue000text\ue000"
"""Stands for the input while the prompt is rendered once (a private-use character: no template holds it)."""


def task_specs(cfg, src: Artifact, splits) -> tuple[dict[str, dict], dict[str, Path]]:
    """task.json of the student's folders, and of the teacher baselines' when there are any; and the model
    folder each was exported from. Keyed by role."""
    student, teacher = Path(src.student()["path"]), src.teacher()
    tasks = {"student": task_spec(loading.load_tokenizer(student, _cpu(cfg.student), "student"), splits, cfg,
                                  cfg.student.name, model_eos(student))}
    if cfg.report.baselines:
        tok = loading.load_tokenizer(Path(teacher["path"]), cfg.teacher, "teacher")
        tasks["teacher"] = task_spec(tok, splits, cfg, teacher.get("name") or cfg.teacher.name,
                                     model_eos(Path(teacher["path"])))
    return tasks, {"student": student, "teacher": Path(teacher["path"])}


def model_eos(folder: Path):
    """The folder's generation config (its end-of-turn tokens), when it has one."""
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None


def task_spec(tok, splits, cfg, model: str, generation_config=None) -> dict:
    """task.json: everything compress.runtime needs to score as compress.evaluate does, without transformers.

    The prompt is rendered once with a sentinel for the text (build_prompt: instruction, chat template, answer
    prefix) and stored as the prefix and suffix around it; every eval example is checked to render the same
    way, so a chat template that changes the text it wraps stops the stage here, before any export."""
    d = cfg.data
    chat = bool(d.use_chat_template and getattr(tok, "chat_template", None))
    rendered = build_prompt(tok, SENTINEL, d)
    prefix, _, suffix = rendered.partition(SENTINEL)
    if rendered.count(SENTINEL) != 1 or any(prefix + e.text + suffix != build_prompt(tok, e.text, d)
                                             for e in splits.eval):
        raise CompressError(Problem("data.use_chat_template", d.use_chat_template, "the chat template does not "
                                    "place the input text verbatim in the prompt, so the exported runtime "
                                    "(predict.py) could not reproduce the measured prompts; set "
                                    "data.use_chat_template=false, or use a model whose template keeps the text"))
    kind = ("generative" if splits.generative else "choices" if any(e.choices is not None for e in splits.eval)
            else "labels" if splits.labelled else "text")
    return {"format": runtime.FORMAT, "model": model, "task": d.name, "kind": kind, "metric": d.metric,
            "prompt": {"prefix": prefix, "suffix": suffix, "add_special_tokens": not chat},
            "use_chat_template": chat, "instruction": d.instruction, "answer_prefix": d.answer_prefix,
            "max_chars": None if d.format == "squad" else d.max_chars,  # SQuAD cuts the passage, not the question
            "verbalizers": dict(splits.verbalizers),
            "generation": {"max_new_tokens": cfg.eval.max_new_tokens, "stop": ["\n"], "eos_token_id": tok.eos_token_id,
                           "eos_token_ids": eos_ids(tok, generation_config)},
            "batch_size": cfg.eval.batch_size, "pad_token_id": tok.pad_token_id,
            "clean_up_tokenization_spaces": bool(getattr(tok, "clean_up_tokenization_spaces", False)),
            "graph_optimization": cfg.export.graph_optimization}


def write_tasks(cfg, splits, records: list[dict], parity: dict, threads: int, tasks: dict[str, dict],
                sources: dict[str, Path]) -> None:
    """Every folder measured in `records` (the student's forms, the teacher baselines) gets its role's task.json,
    predict.py (this package's runtime) and a README whose example ran here, through predict.py's own code."""
    example = readme_example(splits, tasks["student"])
    for r in records:
        folder, variant = Path(r["path"]), r["variant"].removeprefix("onnx-")
        write_json(folder / runtime.TASK_FILE, tasks[r["role"]])
        tmp = folder / "predict.py.tmp"
        shutil.copyfile(runtime.__file__, tmp)
        tmp.replace(folder / "predict.py")
        shown = runtime.Predictor.open(folder, threads).predict([example])[0]
        fig = parity[variant if r["role"] == "student" else f"teacher-{variant}"]
        write_readme(folder, variant, sources[r["role"]], fig, tasks[r["role"]], r, example, shown, len(splits.eval))


def readme_example(splits, task: dict) -> dict:
    """The README's input: the shortest of the first eval examples (with its choices, in a choices task)."""
    ex = min(splits.eval[:20], key=lambda e: len(e.text))
    return {"text": ex.text, **({"choices": list(ex.choices)} if task["kind"] == "choices" else {})}


README = """# {name}

`{source}` exported to ONNX by `compress` (stage `export`, variant `{variant}`): a decoder with KV cache
({graph}), {weights}.
It carries its task, `{task}`: {what}.

Measured by the export stage through onnxruntime on {n} eval examples: {figures}.
Checked against PyTorch on {prompts} prompts ({tokens} tokens): max |logit difference| {diff:.3g}, top-1
agreement {top1:.4f}.

## Run it

```bash
pip install onnxruntime=={ort} tokenizers=={tokenizers} numpy
{command}
```

prints

```
{output}
```

`python predict.py --file in.jsonl --out out.jsonl --threads 4` does a JSON-lines file, in order:
input lines `{input}`, output lines `{shape}`.
`predict.py` needs only onnxruntime, tokenizers and numpy, and scores as the export stage did.{chars}

## Files

- `model.onnx` ({size:.1f} MB), `tokenizer.json`, `config.json`: the model{loads}.
- `task.json`: the task: the prompt around the input (`prompt.prefix` + text + `prompt.suffix`,
  {template}), the labels and the continuation each is scored by, the generation settings, the metric.
- `predict.py`: the runtime; in Python, `from predict import Predictor`, then
  `Predictor.open(".", threads=4).predict([{{"text": ...}}])` (or `.classify`, `.generate`, `.complete`).
"""

WEIGHTS = {"fp32": "fp32 weights",
           "int8": "int8 weights (ONNX Runtime dynamic quantization, per channel; activations quantized on the fly)",
           "int4": "4-bit weight-only MatMulNBits"}
SHAPES = {"labels": '{"label": ..., "scores": {label: log-probability}}',
          "choices": '{"label": ..., "scores": {choice: log-probability}}', "generative": '{"answer": ...}',
          "text": '{"completion": ...}'}


def _what(task: dict) -> str:
    """The task in one phrase, for the README."""
    kind, gen = task["kind"], task["generation"]
    if kind == "labels":
        labels = ", ".join(f"{k} (`{v}`)" for k, v in task["verbalizers"].items())
        return f"labels {labels}, each scored by the summed log-probability of its continuation after the prompt"
    if kind == "choices":
        named = "".join(f", `{v}` for {k}" for k, v in task["verbalizers"].items())
        return ("each input's own choices, each scored by the summed log-probability of its continuation after the "
                f"prompt (\" \" + the choice{named})")
    if kind == "generative":
        return (f"a greedy answer of up to {gen['max_new_tokens']} tokens, cut at the first newline, scored by "
                f"{task['metric']}")
    return f"none (plain text): the input is continued greedily for up to {gen['max_new_tokens']} tokens"


def _figures(task: dict, record: dict) -> str:
    names = {"labels": ("accuracy",), "choices": ("accuracy",), "generative": ("f1", "exact_match"), "text": ()}
    figs = [f"{k.replace('_', ' ')} {record[k]:.4f}" for k in (*names[task["kind"]], "agreement", "perplexity")
            if record.get(k) is not None]
    return ", ".join(figs).replace("agreement", "agreement with the teacher") or "nothing (evaluation off)"


def _quote(text: str) -> str:
    """A shell word in single quotes (shlex.quote leaves a plain word bare)."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def write_readme(folder: Path, variant: str, source: Path, fig: dict, task: dict, record: dict, example: dict,
                 shown: dict, n: int) -> None:
    """The folder's README: the model, its task, the figures measured, and the task's own command with its
    real output."""
    line = json.dumps(example, ensure_ascii=False)
    command = (f"echo {_quote(line)} > in.jsonl\npython predict.py --file in.jsonl" if "choices" in example
               else f"python predict.py {_quote(example['text'])}")
    builder = (folder / "genai_config.json").is_file()  # what the model builder writes, and optimum does not
    (folder / "README.md").write_text(README.format(
        graph="onnxruntime-genai's model builder: fused attention and norms" if builder
        else "optimum `text-generation-with-past`",
        loads="" if builder else ' (optimum loads it too: `ORTModelForCausalLM.from_pretrained(".")`)',
        name=folder.name, source=source.name if source.name != "model" else source.parent.name, variant=variant,
        weights=WEIGHTS[variant], task=task["task"], what=_what(task), n=n, figures=_figures(task, record),
        prompts=fig["prompts"], tokens=fig["tokens"], diff=fig["max_abs_diff"], top1=fig["top1"],
        ort=metadata.version("onnxruntime"), tokenizers=metadata.version("tokenizers"), command=command,
        output=json.dumps(shown, ensure_ascii=False),
        input='{"text": ...}' + (', with "choices": [...]' if task["kind"] == "choices" else ""),
        shape=SHAPES[task["kind"]],
        chars=f" Inputs are cut to {task['max_chars']} characters, as the evaluation's were." if task["max_chars"]
        else "",
        template="the chat template already rendered, encoded as it is" if task["use_chat_template"]
        else "encoded with the tokenizer's special tokens",
        size=weights_size_mb(folder)))



# --------------------------------------------------------------------------- the teacher baseline


BASELINES = {"fp32": "teacher-onnx", "int8": "teacher-onnx-int8"}
"""Folders of the reference teacher's own ONNX forms: what a user gets by just quantizing the teacher."""


def export_baselines(cfg, src: Artifact, out: Path, splits, threads: int) -> dict:
    """The reference teacher exported like the student (ONNX fp32, checked against PyTorch, and int8);
    returns their parity figures, keyed `teacher-fp32` and `teacher-int8`. A baseline that cannot be made
    (an architecture optimum cannot export, a parity failure, too little memory) is skipped with a warning:
    the student's forms, the stage's real output, are measured either way."""
    try:
        return _export_baselines(cfg, src, out, splits, threads)
    except (Exception, MemoryError) as e:
        for folder in BASELINES.values():
            shutil.rmtree(out / folder, ignore_errors=True)
        reason = e.render() if isinstance(e, CompressError) else f"{type(e).__name__}: {str(e)[:300]}"
        say(f"  [yellow]baseline skipped[/]: the reference teacher could not be exported to ONNX ({escape(reason)}); "
            "set report.baselines=false to skip it without this warning")
        return {}


def _export_baselines(cfg, src: Artifact, out: Path, splits, threads: int) -> dict:
    t_dir = Path(src.teacher()["path"])
    say(f"  baseline: the reference teacher {src.teacher().get('name', '')} to ONNX fp32 and int8 ({t_dir})")
    _, fig, model, tok, prompts = export_checked(t_dir, out / BASELINES["fp32"], cfg.teacher, "teacher", cfg, splits,
                                                 threads)
    quantize("int8", out / BASELINES["fp32"], out / BASELINES["int8"], cfg.export)
    lm = ort.OnnxLM.open(out / BASELINES["int8"], threads, cfg.export.graph_optimization)
    parity = {"teacher-fp32": fig,
              "teacher-int8": compare(torch_logits_fn(model), ort.logits_fn(lm), prompts, tok.pad_token_id)}
    del lm
    return parity


def measure_baselines(cfg, src: Artifact, out: Path, splits, parity: dict, threads: int) -> list[dict]:
    """The teacher baselines measured through onnxruntime like the student's forms: role `teacher`, not an
    output of the stage (`output` false: never the reference, never gated)."""
    teacher = src.teacher()
    tok = loading.load_tokenizer(Path(teacher["path"]), cfg.teacher, "teacher")
    records = []
    for variant, folder in BASELINES.items():
        measured = evaluate_onnx(out / folder, tok, splits, cfg, teacher.get("predictions"),
                                 f"teacher onnx-{variant}", threads)
        fig = parity.get(f"teacher-{variant}", {})
        records.append(Record.of(NAME, "teacher", teacher.get("name") or cfg.teacher.name, measured,
                                 backend="onnxruntime", variant=f"onnx-{variant}", path=str(out / folder),
                                 output=False, baseline=True, parity_top1=fig.get("top1"),
                                 parity_max_abs_diff=fig.get("max_abs_diff")).to_dict())
    return records
