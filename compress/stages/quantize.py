"""Stage `quantize`: GPTQ weight-only quantization (GPTQModel), measured through its own kernels.

Consumes: the student (and the teacher, for agreement). Produces: the student: its GPTQ form is
measured (the stage's output record), and `model/`, the unquantized input, is what later stages
(`export`) read.
The artifact:
    model/          the unquantized input model (hard links to the input's files): what `export` reads
    gptq/           the GPTQ checkpoint (packed integer weights, fp16 scales; embeddings and norms in GPTQModel's
                    dtype: bf16 on CPU, fp16 on GPU; quantize_config in config.json); it loads with
                    `GPTQModel.load(dir, device="cpu")` (fast kernels) or, with optimum installed,
                    `AutoModelForCausalLM.from_pretrained(dir)`
    logs/gptq.log   GPTQModel's own output

GPTQModel runs in a child process: once imported it slows every other model of the process (about 2x,
measured) and it prints a great deal on stdout. Calibration texts are prompts of the train split with
their gold answers, then prompts of the unlabeled split, passed as local strings (nothing is
downloaded); never the eval split, which the model is scored on.

GPTQ's speed-ups come from GPU kernels; on a CPU it is a size win: GPTQModel 5.6's CPU kernels decode
slower than fp32 PyTorch on SmolLM2-135M. The record's `note` says so.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compress import extras
from compress.artifact import Artifact, write_json
from compress.console import say
from compress.errors import CompressError, Problem, raise_if
from compress.measure import carry
from compress.records import Record

NAME = "quantize"
CONSUMES = ("teacher", "student")
PRODUCES = ("student",)
KEYS = ("student", "data", "quantize", "run.seed")
SUMMARY = ("GPTQ 4-bit (GPTQModel), evaluated through its kernels; a size win on CPU, speed on GPU; "
           "passes the unquantized model on")
BITS = (2, 3, 4, 8)
NOTE = "GPTQ's speed-ups need GPU kernels; on a CPU it is a size win (its CPU kernels decode slower than fp32)"


def check(cfg) -> list[Problem]:
    """The `quantize` section."""
    q, problems = cfg.quantize, []
    if q.bits not in BITS:
        problems.append(Problem("quantize.bits", q.bits, f"GPTQ supports {', '.join(map(str, BITS))} bits"))
    if q.group_size != -1 and q.group_size < 1:
        problems.append(Problem("quantize.group_size", q.group_size, "must be >= 1 (a divisor of every layer's "
                                "input width, e.g. 32, 64 or 128), or -1 for one group per row"))
    if not 0 < q.damp_percent < 1:
        problems.append(Problem("quantize.damp_percent", q.damp_percent, "must be in (0, 1), e.g. 0.05"))
    for k in ("calibration_samples", "calibration_batch_size"):
        if q[k] < 1:
            problems.append(Problem(f"quantize.{k}", q[k], "must be >= 1"))
    return problems


def preflight(cfg) -> list[Problem]:
    """In the pipeline: GPTQModel installed, and enough calibration prompts outside the eval split."""
    from compress.data import load_splits

    problems = _missing_gptqmodel()
    splits, n = load_splits(cfg.data), cfg.quantize.calibration_samples
    if len(splits.train) + len(splits.unlabeled) < n:
        problems.append(Problem("quantize.calibration_samples", n, f"GPTQ calibrates on train and unlabeled prompts "
                                f"(never eval), and this data has {len(splits.train)} + {len(splits.unlabeled)}: "
                                f"set quantize.calibration_samples<={len(splits.train) + len(splits.unlabeled)} or "
                                "raise data.train_size / data.unlabeled_size"))
    return problems


def require_gptqmodel() -> None:
    raise_if(_missing_gptqmodel(), "GPTQModel is missing")


def _missing_gptqmodel() -> list[Problem]:
    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    return [Problem("pipeline.stages", "quantize", f"the quantize stage needs GPTQModel (an optional extra; "
                    f"missing: {', '.join(missing)}): run `{extras.install('gptq')}`, or drop `quantize` from "
                    "the pipeline")] if missing else []


# --------------------------------------------------------------------------- checks


def input_widths(config: dict) -> dict[str, int]:
    """Input width of each kind of quantized linear layer of a Llama-style config."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {"q/k/v/gate/up_proj (hidden_size)": config["hidden_size"], "o_proj (heads x head_dim)": heads * head_dim,
            "down_proj (intermediate_size)": config["intermediate_size"]}


def check_group_size(group_size: int, config: dict) -> None:
    """GPTQ groups tile each row of a layer's input: the group size must divide every input width."""
    if group_size == -1:
        return
    widths = input_widths(config)
    bad = {k: w for k, w in widths.items() if w % group_size}
    if bad:
        g = math.gcd(*widths.values())
        fits = [s for s in (128, 64, 32, 16) if g % s == 0]
        hint = f"e.g. quantize.group_size={fits[0]}" if fits else "quantize.group_size=-1 (one group per row)"
        raise CompressError(Problem("quantize.group_size", group_size, "must divide the input width of every "
                                    f"quantized layer; it does not divide {bad}: choose {hint}"))


# --------------------------------------------------------------------------- stage


def link_model(src: Path, dest: Path) -> None:
    """`dest` holds the files of `src`: hard links where the filesystem allows, else copies."""
    shutil.rmtree(dest, ignore_errors=True)  # a resumed stage links again
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)


def run(cfg, src: Artifact, out: Path) -> dict:
    require_gptqmodel()
    q = cfg.quantize
    source = Path(src.student()["path"])
    check_group_size(q.group_size, json.loads((source / "config.json").read_text()))
    link_model(source, out / "model")
    say(f"  GPTQ {q.bits}-bit, group size {q.group_size}, {q.calibration_samples} calibration prompts "
        f"(GPTQModel runs in a child process; its output goes to logs/gptq.log)")
    measured = _in_child(cfg, out, src.teacher().get("predictions"), quantize=True)
    say(f"  GPTQ model: {measured['size_mb']:.1f} MB, quantized in {measured['quantize_s']:.0f} s; note: {NOTE}")
    return {"records": [_record(cfg, out, measured)],
            "roles": carry(src, out, student={"path": out / "model", "name": cfg.student.name}),
            "input_model": str(source), "gptq": {"bits": q.bits, "group_size": q.group_size, "desc_act": q.desc_act,
                                                  "sym": q.sym}, "quantize_s": measured["quantize_s"], "note": NOTE}


def reevaluate(cfg, src: Artifact, path: Path) -> dict:
    """Measure the saved GPTQ model again, in a child process (the evaluation settings changed)."""
    require_gptqmodel()
    measured = _in_child(cfg, path, src.teacher().get("predictions"), quantize=False)
    measured["quantize_s"] = next((r.get("quantize_s") for r in Artifact.load(path).metrics()["records"]), None)
    return {"records": [_record(cfg, path, measured)]}


def _record(cfg, out: Path, measured: dict) -> dict:
    return Record.of(NAME, "student", cfg.student.name, measured, backend="gptq", variant="gptq",
                     path=str(out / "gptq"), note=NOTE).to_dict()


def _in_child(cfg, out: Path, reference: list[str] | None, quantize: bool) -> dict:
    """Run `quantize_and_measure` (or only the measuring) in a fresh Python process; return its record."""
    from omegaconf import OmegaConf

    out = out.resolve()
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    job, result = logs / "gptq_job.json", logs / "gptq_result.json"
    write_json(job, {"cfg": OmegaConf.to_container(cfg, resolve=True), "out": str(out), "reference": reference,
                     "quantize": quantize})
    workers = os.environ.get("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": workers, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(logs / "gptq.log", "a") as log:  # GPTQModel's chatter; our progress bars stay on stderr
        proc = subprocess.run([sys.executable, "-c", CHILD, str(job)], stdout=log,
                              stderr=subprocess.PIPE, text=True, env=env,  # the user's cwd: relative paths hold
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.write(proc.stderr)
    job.unlink()
    answer = json.loads(result.read_text()) if result.exists() else None
    result.unlink(missing_ok=True)
    if proc.returncode == 2 and answer and "problems" in answer:
        raise CompressError([Problem(**p) for p in answer["problems"]], "quantize")
    if proc.returncode != 0 or answer is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"GPTQ quantization failed (exit {proc.returncode}); see {logs / 'gptq.log'}:\n{tail}")
    return answer


# --------------------------------------------------------------------------- child process


def calibration_texts(tok, cfg, splits) -> list[str]:
    """Train prompts (chat template applied) followed by their gold answers, then unlabeled prompts: what the
    model will see. Never the eval split: the quantized model is scored on it."""
    from compress.evaluate import build_prompt

    n = cfg.quantize.calibration_samples
    texts = [build_prompt(tok, e.text, cfg.data) + splits.answer(e) for e in splits.train[:n]]
    texts += [build_prompt(tok, e.text, cfg.data) for e in splits.unlabeled[: n - len(texts)]]
    if len(texts) < n:
        raise CompressError(Problem("quantize.calibration_samples", n, f"only {len(texts)} train and unlabeled "
                                    f"prompts (GPTQ never calibrates on eval): lower it or raise data.train_size"))
    return texts


def source_params(folder: Path) -> int:
    """Parameters of the unquantized model, from its safetensors headers (shared tensors once)."""
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def quantize_and_measure(cfg, out: Path, reference: list[str] | None, quantize: bool = True) -> dict:
    """Quantize `out/model` into `out/gptq` (unless `quantize` is False), load it back through GPTQModel's
    kernels and measure it."""
    from gptqmodel import GPTQModel, QuantizeConfig

    from compress.data import load_splits
    from compress.evaluate import evaluate_torch, peak_memory, weights_size_mb
    from teachers import loading

    q, source = cfg.quantize, out / "model"
    device = loading.pick_device(cfg.student.device)
    splits = load_splits(cfg.data)
    tok = loading.load_tokenizer(source, cfg.student, "student")
    qc = QuantizeConfig(bits=q.bits, group_size=q.group_size, desc_act=q.desc_act, sym=q.sym,
                        damp_percent=q.damp_percent, offload_to_disk=False, pack_impl="original")
    t0 = time.perf_counter()
    if quantize:
        texts, cwd = calibration_texts(tok, cfg, splits), os.getcwd()
        os.chdir(out / "logs")  # GPTQModel writes its gptq_log_*.log files into the working directory
        try:
            model = GPTQModel.load(str(source), qc, device=str(device))  # its dtype: bf16 on CPU, fp16 on GPU
            model.quantize(texts, batch_size=q.calibration_batch_size)
            model.save(str(out / "gptq"))
        finally:
            os.chdir(cwd)
        tok.save_pretrained(out / "gptq")
        del model
    quantize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with peak_memory(device) as mem:
        # GPTQModel's own activation dtype (bf16 on CPU, fp16 on GPU): its fused CPU kernel took 45x longer
        # on an fp32 prefill (68 s vs 1.6 s for 16 x 130 tokens, SmolLM2 student)
        qmodel = GPTQModel.load(str(out / "gptq"), device=str(device))
        record = evaluate_torch(qmodel.model, tok, splits, cfg.data, cfg.eval, reference, "gptq")
        del qmodel
    record.pop("predictions", None)
    record.update(params=source_params(source), peak_mem_mb=mem["peak_mem_mb"], size_mb=weights_size_mb(out / "gptq"),
                  eval_s=time.perf_counter() - t0)
    if quantize:
        record["quantize_s"] = quantize_s
    return record


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies (a killed `compress run` leaves no orphan)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


CHILD = "import sys; from compress.stages.quantize import worker; sys.exit(worker(sys.argv[1]))"
"""The child's program (not `-m`: the stage table imports this module first, and runpy would run it twice)."""


def worker(job_path: str | Path) -> int:
    from omegaconf import OmegaConf

    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    try:
        result = quantize_and_measure(OmegaConf.create(job["cfg"]), out, job["reference"], job["quantize"])
    except CompressError as e:
        write_json(out / "logs" / "gptq_result.json", {"problems": [
            {"key": p.key, "value": p.value, "fix": p.fix} for p in e.problems]})
        return 2
    write_json(out / "logs" / "gptq_result.json", result)
    return 0
