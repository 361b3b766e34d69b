"""The runner: walks the stage table (compress/stages/) over `cfg.pipeline.stages`.

A stage is a module with `run(cfg, src: Artifact, out: Path) -> metrics`. It reads only its
input artifact (and the config), and writes only `out`, a temporary folder that the runner
renames to `<run>/<NN>_<stage>/` once config.yaml, metrics.json, manifest.json and DONE are in
it. A rerun skips a stage whose folder is DONE with the same identity (its config sections and
its input); a change reruns that stage and every one after it.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from omegaconf import OmegaConf
from rich.markup import escape

from compress import dist, results, validate
from compress.artifact import PARTIAL, TRAINING, Artifact, finish, is_done, versions, write_json
from compress.console import out, say
from compress.errors import CompressError, Problem, raise_if
from compress.hub import text_hash
from compress.lock import holder, run_lock
from compress.measure import carry
from compress.report import against_baseline, verdict, write_report
from compress.stages import ROLES, STAGES, Stage
from compress.training import trainer_problems

TRAINS = {"finetune_teacher", "distill", "prune"}
"""Stages that build a Lightning Trainer (prune: its recovery distillation)."""
USES_TRAIN_DATA = TRAINS | {"quantize"}
"""Stages that read the train or unlabeled split (quantize: GPTQ calibration)."""


def preflight(cfg, given: set[str] = frozenset()) -> None:
    """Every check that can fail before a stage starts, all problems at once: the shared config, every
    stage's own section, the pipeline's roles, the data (its split sizes fitted: `fit_data`), and what
    the listed stages need to run here. `given`: the keys the user set on the command line."""
    from compress.data import load_splits

    problems = validate.problems(cfg)
    for stage in STAGES.values():
        problems += stage.check(cfg)
    problems += role_problems(list(cfg.pipeline.stages))
    if TRAINS & set(cfg.pipeline.stages) and not any(p.key.startswith("trainer.") for p in problems):
        problems += trainer_problems(cfg.trainer)  # what Lightning itself refuses on this machine
    raise_if(problems, "invalid configuration")
    fit_data(cfg, given)
    load_splits(cfg.data)
    for name in dict.fromkeys(cfg.pipeline.stages):
        problems += STAGES[name].preflight(cfg)
    raise_if(problems, "the pipeline cannot run")


def fit_data(cfg, given: set[str] = frozenset()) -> None:
    """Set the split sizes the data and this pipeline allow (in `cfg.data`, before any stage hashes it): no
    train or unlabeled split when nothing trains; preset sizes shrunk in proportion for a small file."""
    from compress.data import count_examples, fit_sizes

    trains = bool(USES_TRAIN_DATA & set(cfg.pipeline.stages))
    sizes, change = fit_sizes(cfg.data, count_examples(cfg.data), trains,
                              {k.split(".", 1)[1] for k in given if k.startswith("data.")})
    if change:
        say(f"  data: {change}")
        for k, v in sizes.items():
            OmegaConf.update(cfg, f"data.{k}", v)


def role_problems(stages: list[str]) -> list[Problem]:
    """Walk the pipeline with the roles each stage consumes and produces: a stage that needs a role no
    earlier stage produced is a problem (named, with the fix)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        return [Problem("pipeline.stages", stages, f"unknown or no stages ({', '.join(unknown) or 'empty'}); "
                        f"stages are: {', '.join(STAGES)}")]
    problems, have = [], set()
    for i, name in enumerate(stages):
        for role in STAGES[name].consumes:
            if role not in have:
                producers = [s.name for s in STAGES.values() if role in s.produces and s.name != name]
                problems.append(Problem("pipeline.stages", stages, f"stage {name} (#{i}) needs {ROLES[role]}, "
                                        f"and no stage before it produces one (produced by: {', '.join(producers)}); "
                                        f"start the pipeline with evaluate, e.g. pipeline.stages="
                                        f"[{', '.join(['evaluate'] + [s for s in stages if s != 'evaluate'])}]"))
        have |= set(STAGES[name].produces)
    return problems


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
                if Artifact.load(path).manifest.get("eval_hash") != eval_hash:
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
    line = verdict(against_baseline(res["records"]))
    if line:
        say(escape(line))
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
    fresh = stage.reevaluate(cfg, src, path)
    if "roles" not in fresh:  # the teacher it carries was re-measured upstream: carry it again
        fresh["roles"] = carry(src, path, student=artifact.student())
    metrics = {**artifact.metrics(), **fresh}
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
    metrics["summary"] = stage.summary  # the report reads the run folder alone
    for record in metrics.get("records", []):  # paths inside the temporary folder move with it
        if str(record.get("path") or "").startswith(str(tmp)):
            record["path"] = str(path) + record["path"][len(str(tmp)):]
        if record.get("stage_wall_s") is None:
            record["stage_wall_s"] = wall
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
