"""The stage table and the runner that walks it.

A stage is a plain function `run(cfg, src: Artifact, out: Path) -> metrics`. It reads only
its input artifact (and the config), and writes only `out`, a temporary folder that the
runner renames to `<run>/<NN>_<stage>/` once config.yaml, metrics.json, manifest.json and
DONE are in it. A rerun skips a stage whose folder is DONE with the same identity (its
config sections and its input); a change reruns that stage and every one after it.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from compress import dist, results
from compress.artifact import PARTIAL, TRAINING, Artifact, finish, is_done, versions, write_json
from compress.console import out, say
from compress.errors import CompressError, Problem
from compress.lock import holder, run_lock
from compress.hub import text_hash
from compress.report import write_report
from compress.stages import evaluate, export, quantize
from students import distill, prune
from teachers import finetune


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DictConfig, Artifact, Path], dict]
    keys: tuple[str, ...]
    """Config sections whose values the stage depends on: a change in one reruns it."""
    summary: str
    """One line for `compress presets`."""
    reevaluate: Callable[[DictConfig, Artifact, Path], dict] | None = None
    """Measures the stage's model again; when set, a change of `eval` settings alone re-measures
    the finished stage instead of redoing its work."""


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("evaluate", evaluate.run, ("teacher", "student", "data", "run.seed"),
          "score teacher and student as they are: accuracy, agreement, perplexity, latency, size, memory",
          evaluate.run),
    Stage("finetune_teacher", finetune.run, ("teacher", "data", "finetune", "trainer", "run.seed"),
          "QLoRA / LoRA / full fine-tuning of the teacher (Lightning); adapter + merged teacher, evaluated",
          finetune.reevaluate),
    Stage("distill", distill.run, ("teacher", "student", "data", "distill", "trainer", "run.seed"),
          "soft-label + pseudo-label distillation into the student (Lightning), evaluated", distill.reevaluate),
    Stage("prune", prune.run, ("teacher", "student", "data", "prune", "distill", "trainer", "run.seed"),
          "structured pruning (torch-pruning: MLP units, GQA-aware heads, layers), then recovery distillation; "
          "evaluated before and after recovery", prune.reevaluate),
    Stage("quantize", quantize.run, ("student", "data", "quantize", "run.seed"),
          "GPTQ 4-bit (GPTQModel), evaluated through its kernels; a size win on CPU, speed on GPU; "
          "passes the unquantized model on", quantize.reevaluate),
    Stage("export", export.run, ("teacher", "student", "data", "export", "run.seed"),
          "ONNX export (optimum) checked against PyTorch, int8/int4 CPU variants, evaluated through onnxruntime",
          export.reevaluate),
]}


def preflight(cfg) -> None:
    """Every check that can fail before a stage starts: config, data, and what the stages need."""
    from compress.data import load_splits
    from compress.validate import validate
    from teachers.loading import pick_device

    validate(cfg)
    load_splits(cfg.data)
    if "finetune_teacher" in cfg.pipeline.stages and cfg.teacher.method == "qlora":
        finetune.check_4bit(pick_device(cfg.teacher.device))
    if "distill" in cfg.pipeline.stages and cfg.distill.soft_weight > 0 and (cfg.student.path or cfg.student.random):
        _check_vocabularies(cfg)  # a student of its own: fail now, not after hours of earlier stages
    if "quantize" in cfg.pipeline.stages:
        quantize.require_gptqmodel()
    if "export" in cfg.pipeline.stages:
        export.preflight(cfg)


def _check_vocabularies(cfg) -> None:
    from teachers import loading

    t = loading.load_tokenizer(loading.resolve(cfg.teacher, "teacher"), cfg.teacher, "teacher")
    s = loading.load_tokenizer(loading.resolve(cfg.student, "student"), cfg.student, "student")
    distill.check_tokenizers(t, s, cfg.distill.soft_weight)


def run_dir(cfg) -> Path:
    """The run folder, absolute: the paths that results.json and the artifacts record work from any folder."""
    return Path(cfg.run.root).expanduser().resolve() / cfg.run.name


def stage_dirs(cfg) -> list[Path]:
    return [run_dir(cfg) / f"{i:02d}_{name}" for i, name in enumerate(cfg.pipeline.stages)]


def config_hash(cfg, keys: tuple[str, ...]) -> str:
    """Hash of the named config sections, plus size and mtime of any local file they name."""
    parts = {}
    for key in keys:
        node = OmegaConf.select(cfg, key)
        parts[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return text_hash(json.dumps([parts, _file_stamps(parts)], sort_keys=True, default=str))[:16]


def _file_stamps(tree) -> list:
    stamps = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k.endswith("path") and isinstance(v, str) and Path(v).expanduser().is_file():
                st = Path(v).expanduser().stat()
                stamps.append([v, st.st_size, st.st_mtime_ns])
            else:
                stamps += _file_stamps(v)
    return stamps


def run_pipeline(cfg) -> Path:
    """Run (or resume) every stage of `cfg.pipeline`; return the run folder."""
    root = run_dir(cfg)
    if dist.is_follower():
        return _follow(cfg, root)
    root.mkdir(parents=True, exist_ok=True)
    with run_lock(root, cfg.run.name):
        src = Artifact.start()
        for path in stage_dirs(cfg):
            stage = STAGES[path.name.split("_", 1)[1]]
            chash = config_hash(cfg, stage.keys)
            identity = text_hash(stage.name + chash + src.identity)[:16]
            eval_hash = config_hash(cfg, ("eval",))
            if is_done(path, identity):
                if stage.reevaluate is not None and Artifact.load(path).manifest.get("eval_hash") != eval_hash:
                    _reevaluate(cfg, stage, src, path, eval_hash)
                else:
                    say(f"[green]✓[/] {path.name}: up to date, skipped (delete the folder or change its config to rerun)")
                src = Artifact.load(path)
                continue
            say(f"[bold]▶ {path.name}[/]: {stage.summary}")
            src = _run_stage(cfg, stage, src, path, chash, identity, eval_hash)
        res = results.collect(stage_dirs(cfg))
        OmegaConf.save(cfg, root / "config.yaml", resolve=True)  # the job that results.json reports
        results.write(root, res)
        md, png = write_report(root)
    out.print(results.table(res["records"], title=f"results: {root}"))
    say(f"report: {md} and {png}")
    return root


def partial(tmp: Path) -> dict:
    try:
        return json.loads((tmp / PARTIAL).read_text())
    except (OSError, ValueError):
        return {}


def _follow(cfg, root: Path, poll_s: float = 1.0) -> Path:
    """Rank > 0: walk the stages with rank 0; join each training stage's `fit`, write nothing."""
    src = Artifact.start()
    for path in stage_dirs(cfg):
        stage = STAGES[path.name.split("_", 1)[1]]
        identity = text_hash(stage.name + config_hash(cfg, stage.keys) + src.identity)[:16]
        tmp, joined = path.parent / f".{path.name}.tmp", False
        while not is_done(path, identity):
            marker = partial(tmp)
            if not joined and marker.get("identity") == identity and _attempt(tmp / TRAINING) == marker["attempt"]:
                stage.run(cfg, src, tmp)  # returns right after fit on ranks > 0
                joined = True
            elif holder(root) is None and not is_done(path, identity):
                raise CompressError(Problem("run.name", cfg.run.name, f"rank {dist.rank()}: rank 0 left the run "
                                            f"before {path.name} was done; see rank 0's output"))
            time.sleep(poll_s)
        src = Artifact.load(path)
    return root


def _attempt(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("attempt")
    except (OSError, ValueError):
        return None


def _reevaluate(cfg, stage: Stage, src: Artifact, path: Path, eval_hash: str) -> None:
    """Only the evaluation settings changed: measure the finished stage's model again, in place."""
    say(f"[bold]▶ {path.name}[/]: evaluation settings changed, re-measuring its model (its work is kept)")
    artifact = Artifact.load(path)
    metrics = {**artifact.metrics(), **stage.reevaluate(cfg, src, path)}
    write_json(path / "metrics.json", metrics)
    write_json(path / "manifest.json", {**artifact.manifest, "eval_hash": eval_hash})


def _run_stage(cfg, stage: Stage, src: Artifact, path: Path, chash: str, identity: str,
               eval_hash: str) -> Artifact:
    """Run a stage in `.<NN>_<stage>.tmp/`. An unfinished folder made for the same identity is
    resumed (training continues from its last checkpoint); any other is started afresh."""
    tmp = path.parent / f".{path.name}.tmp"
    if partial(tmp).get("identity") == identity:
        say(f"  resuming the unfinished {path.name} in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    write_json(tmp / PARTIAL, {"stage": stage.name, "identity": identity, "attempt": uuid.uuid4().hex,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    OmegaConf.save(cfg, tmp / "config.yaml", resolve=True)
    t0 = time.perf_counter()
    metrics = stage.run(cfg, src, tmp)  # on error the folder stays, to be resumed by the same command
    wall = time.perf_counter() - t0
    metrics["wall_s"] = wall
    for record in metrics.get("records", []):  # paths inside the temporary folder move with it
        if str(record.get("path", "")).startswith(str(tmp)):
            record["path"] = str(path) + record["path"][len(str(tmp)):]
        record.setdefault("stage_wall_s", wall)
    manifest = {"stage": stage.name, "identity": identity, "config_hash": chash, "eval_hash": eval_hash,
                "input": src.identity,
                "input_path": str(src.path) if src.path else None, "versions": versions(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": wall}
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # resume state, not part of the artifact
    for name in (PARTIAL, TRAINING):
        (tmp / name).unlink(missing_ok=True)
    finish(tmp, path, metrics, manifest)
    say(f"[green]✓[/] {path.name}: done in {wall:.1f} s")
    return Artifact.load(path)
