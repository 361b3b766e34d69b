"""The `compress` command: an explicit table from command name to function.

Bad input of any kind ends with exit code 2 and a message naming key, value and fix.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from rich.markup import escape

from compress.console import console, out, say
from compress.errors import CompressError, Problem

OVERRIDES_HELP = "Hydra overrides: GROUP=PRESET (teacher=llama7b) or KEY=VALUE (data.eval_size=200)"


def _quiet() -> None:
    """Keep library chatter out of the user's terminal; errors still surface."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    # transformers reads this when imported: commands that load no model (check, report) skip its seconds of import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (main() called in-process): set the level directly
        sys.modules["transformers"].logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "failed to fetch a CPU kernel from the hub"
    for name in ("torchao", "torch.utils._pytree"):  # imported by transformers when the gptq extra is installed
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_run(args) -> int:
    from omegaconf import OmegaConf

    from compress.config import given_keys, load_config
    from compress.pipeline import preflight, run_pipeline

    from compress import dist

    cfg = load_config(args.overrides)
    if cfg.run.name is None:
        if dist.launched_externally() and not os.environ.get("COMPRESS_RUN_NAME"):
            raise CompressError(Problem("run.name", None, "several processes (torchrun / SLURM) must share one "
                                        "run folder: set run.name= the same name on every process"))
        # processes that Lightning's DDP launcher starts run this command again: same name for them
        os.environ.setdefault("COMPRESS_RUN_NAME", time.strftime("%Y%m%d-%H%M%S"))
        OmegaConf.update(cfg, "run.name", os.environ["COMPRESS_RUN_NAME"])
    preflight(cfg, given_keys(args.overrides))  # bad config or data fails here, before any stage starts
    if args.dry_run:
        out.print(OmegaConf.to_yaml(cfg))
        return 0
    run_pipeline(cfg)
    return 0


def cmd_presets(args) -> int:
    from rich.table import Table

    from compress.config import presets
    from compress.stages import STAGES

    table = Table(title="presets (select with GROUP=OPTION)")
    for col in ("group", "option", "description"):
        table.add_column(col)
    for group, options in presets().items():
        for option, description in options.items():
            table.add_row(group, option, description)
    for name, stage in STAGES.items():
        table.add_row("stage", name, stage.summary)
    out.print(table)
    return 0


def cmd_eval(args) -> int:
    from omegaconf import OmegaConf

    from compress import stats
    from compress.artifact import write_json
    from compress.config import load_config
    from compress.data import load_splits
    from compress.measure import evaluate_folder
    from compress.records import Record
    from compress.results import table
    from compress.validate import validate
    from teachers import loading

    cfg = load_config(args.overrides)
    validate(cfg)
    model_cfg = OmegaConf.merge(cfg.teacher, _model_source(args.model))
    splits = load_splits(cfg.data)
    folder = loading.resolve(model_cfg, "teacher")
    record = evaluate_folder(folder, model_cfg, "teacher", splits, cfg)
    record = Record.of("eval", "teacher", model_cfg.name, record, path=str(folder))
    record.score_ci = stats.mean_ci(record.example_scores)  # no run, no relate: only its own interval
    record = record.to_dict()
    out.print(table([record], title=f"eval: {args.model} on {cfg.data.name}"))
    if args.out:
        write_json(Path(args.out), {"records": [record]})
    return 0


def cmd_plan(args) -> int:
    from compress import plan
    from compress.config import load_config
    from compress.validate import validate
    from teachers.loading import pick_device

    cfg = load_config(args.overrides)
    validate(cfg)
    mem = plan.parse_size(args.gpu_mem) if args.gpu_mem else None
    device = args.device or ("cuda" if mem else str(pick_device(cfg.teacher.device)))
    result = plan.plan(cfg, device)
    out.print(plan.table(result, mem, cfg))
    if mem:
        out.print(plan.verdict(result, mem, cfg))
    return 0


def _model_source(spec: str) -> dict:
    """MODEL as a stage folder (its model/), a model folder, a .gguf file, or a hub id."""
    path = Path(spec).expanduser()
    from compress.config import model_name

    source = {"name": model_name(spec) if Path(spec).expanduser().exists() else spec, "random": None,
              "gguf_package": None, "gguf_file": None, "hub_id": None, "path": None}
    if (path / "model").is_dir():
        source["path"] = str(path / "model")
    elif path.exists() or spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        source["path"] = str(path)
    else:
        source["hub_id"] = spec
    if source["path"] and not path.exists():
        raise CompressError(Problem("MODEL", spec, "no such file or folder; give a model folder, a run's "
                                    "stage folder, a .gguf file or a hub id"))
    return source


def cmd_report(args) -> int:
    from compress.report import write_report

    md, png = write_report(Path(args.run))
    out.print(f"{md}\n{png}")
    return 0


def cmd_check(args) -> int:
    from compress import gate

    run = Path(args.run)
    stage, rows = gate.checks(run, args.min_retention, args.stage, Path(args.baseline) if args.baseline else None,
                              args.max_drop, args.max_perplexity_ratio, args.confidence)
    out.print(gate.table(run, stage, rows))
    return 0 if all(c.passed for c in rows) else 1


def cmd_bench(args) -> int:
    from compress.artifact import write_json
    from compress.bench import bench, table

    try:
        lengths = [int(n) for n in args.prompt_lengths.split(",") if n.strip()]
    except ValueError:
        raise CompressError(Problem("--prompt-lengths", args.prompt_lengths, "comma-separated integers, e.g. "
                                    "32,128,512")) from None
    result = bench(args.model, args.threads, lengths or [128], args.decode_tokens, args.warmup, args.runs)
    out.print(table(result))
    if args.json:
        write_json(Path(args.json), result)
    return 0


def _exported_folder(spec: str) -> Path:
    """FOLDER of `compress predict` and `compress serve`: an exported folder (model.onnx and task.json)."""
    from compress import runtime

    folder = Path(spec).expanduser()
    try:
        runtime.read_task(folder)
    except runtime.BadInput as e:
        raise CompressError(Problem(e.key, e.value, e.fix)) from None
    return folder


def cmd_predict(args) -> int:
    from compress import runtime

    if args.threads is not None and args.threads < 1:
        raise CompressError(Problem("--threads", args.threads, "must be >= 1"))
    try:
        return runtime.predict_cli(_exported_folder(args.folder), args.texts, args.file, args.out, args.threads)
    except runtime.BadInput as e:
        raise CompressError(Problem(e.key, e.value, e.fix)) from None


def cmd_serve(args) -> int:
    from compress import serve  # noqa: F401  (fastapi, uvicorn)

    problems = [Problem(key, value, fix) for key, value, bad, fix in (
        ("--port", args.port, not 0 < args.port < 65536, "a TCP port in 1-65535, e.g. 8000"),
        ("--max-batch", args.max_batch, args.max_batch < 1, "must be >= 1, e.g. 16"),
        ("--wait-ms", args.wait_ms, args.wait_ms < 0, "must be >= 0, e.g. 5"),
        ("--threads", args.threads, args.threads is not None and args.threads < 1, "must be >= 1, or unset")) if bad]
    if problems:
        raise CompressError(problems)
    from compress import runtime

    folder = _exported_folder(args.folder)
    try:
        serve.serve(folder, args.host, args.port, args.threads, args.max_batch, args.wait_ms)
    except runtime.BadInput as e:
        raise CompressError(Problem(e.key, e.value, e.fix)) from None
    return 0


COMMANDS = {  # name: (function, one-line help)
    "run": (cmd_run, "run a pipeline of stages (default: the embedded SmolLM2 job) and report every stage"),
    "presets": (cmd_presets, "list every config group option and every stage, one line each"),
    "eval": (cmd_eval, "evaluate one model (folder, run stage folder, .gguf file or hub id) on a task"),
    "report": (cmd_report, "rebuild a run's report.md and report.png from its results.json"),
    "check": (cmd_check, "gate a run on retained accuracy: exit 0 pass, 1 fail, 2 bad input"),
    "bench": (cmd_bench, "latency only (prefill at several prompt lengths, decode tok/s, peak memory) of a model"),
    "predict": (cmd_predict, "run an exported ONNX folder's task (task.json) on texts: one JSON line each"),
    "plan": (cmd_plan, "estimate peak memory of fine-tuning (full / LoRA / QLoRA) and distillation; what fits"),
    "serve": (cmd_serve, "serve an exported folder over HTTP: /v1/classify and OpenAI-compatible completions"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Fine-tune, distil, prune, quantize and export an "
                                "LLM, measuring accuracy retention and latency after every step.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == "eval":
            sp.add_argument("model", metavar="MODEL", help="model folder, stage folder, .gguf file or hub id")
            sp.add_argument("--out", help="also write the record as JSON to this file")
        if name in ("report", "check"):
            sp.add_argument("run", metavar="RUN", help="a run folder, <run.root>/<run.name>")
        if name == "check":
            sp.add_argument("--min-retention", type=float, default=0.9,
                            help="lowest allowed accuracy / reference teacher's accuracy (default 0.9)")
            sp.add_argument("--stage", help="stage to check (default: the last stage that evaluated a student)")
            sp.add_argument("--baseline", metavar="OTHER_RUN", help="also compare the primary metric with the same "
                            "record of this run (same eval examples), paired example by example")
            sp.add_argument("--max-drop", type=float, default=0.01,
                            help="with --baseline, fail only when the drop is significant (its --confidence interval "
                            "lies wholly above 0) AND larger than this (default 0.01)")
            sp.add_argument("--confidence", type=float, default=0.95,
                            help="confidence of the paired bootstrap interval of the drop, in (0, 1) (default 0.95)")
            sp.add_argument("--max-perplexity-ratio", type=float, metavar="R",
                            help="also fail when a student's perplexity exceeds R x the reference teacher's "
                            "(language ability: 1.5 allows 50%% more)")
        if name == "bench":
            sp.add_argument("model", metavar="MODEL", help="model folder, a run's stage folder (its model/) or a "
                            ".gguf file (llama.cpp)")
            sp.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
            sp.add_argument("--prompt-lengths", default="32,128,512", help="prompt tokens to time prefill at")
            sp.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode timing")
            sp.add_argument("--warmup", type=int, default=1, help="untimed runs first")
            sp.add_argument("--runs", type=int, default=5, help="timed runs; medians are reported")
            sp.add_argument("--json", metavar="PATH", help="also write the result as JSON")
        if name == "predict":
            sp.add_argument("folder", metavar="FOLDER", help="an exported folder: onnx/, onnx-int8/ or onnx-int4/ of "
                            "a run's export stage")
            sp.add_argument("texts", nargs="*", metavar="TEXT", help="texts to predict")
            sp.add_argument("--file", help='JSON-lines input, one {"text": ...} per line ("choices": [...] for a '
                            "task whose examples carry their own)")
            sp.add_argument("--out", help="write the JSON lines here instead of stdout")
            sp.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
        if name == "serve":
            sp.add_argument("folder", metavar="FOLDER", help="an exported folder (model.onnx + task.json), e.g. "
                            "RUN/05_export/onnx-int8")
            sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
            sp.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
            sp.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
            sp.add_argument("--max-batch", type=int, default=16, help="most inputs run together (default 16)")
            sp.add_argument("--wait-ms", type=float, default=5.0,
                            help="how long a batch waits for more concurrent requests (default 5 ms)")
        if name == "run":
            sp.add_argument("--dry-run", action="store_true", help="print the composed config and stop")
        if name == "plan":
            sp.add_argument("--gpu-mem", help="memory per device, e.g. 24GB: say which methods fit")
            sp.add_argument("--device", choices=("cpu", "cuda"), help="plan for this device (default: cuda with "
                            "--gpu-mem, else the teacher's device)")
        if name in ("run", "eval", "plan"):
            sp.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=OVERRIDES_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    _quiet()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a preempted job: release the lock, keep the stage
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return COMMANDS[args.command][0](args)
    except CompressError as e:
        console.print(f"[bold red]error:[/] {escape(e.render())}", highlight=False, soft_wrap=True)
        return 2
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            console.print(f"[bold red]error:[/] disk full while writing {e.filename or ''}: free space or set "
                          "run.root= a folder on a larger disk; finished stages are kept", highlight=False)
            return 2
        raise
    except KeyboardInterrupt:
        say("interrupted: finished stages are kept; rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
