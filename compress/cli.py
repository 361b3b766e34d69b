"""The `compress` command: an explicit table from command name to function.

Bad input of any kind ends with exit code 2 and a message naming key, value and fix.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import warnings
from pathlib import Path

from compress.console import console, out, say
from compress.errors import CompressError, Problem

OVERRIDES_HELP = "Hydra overrides: GROUP=PRESET (teacher=llama7b) or KEY=VALUE (data.eval_size=200)"


def _quiet() -> None:
    """Keep library chatter out of the user's terminal; errors still surface."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "failed to fetch a CPU kernel from the hub"
    for name in ("torchao", "torch.utils._pytree"):  # imported by transformers when the gptq extra is installed
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_run(args) -> int:
    from omegaconf import OmegaConf

    from compress.config import load_config
    from compress.pipeline import preflight, run_pipeline

    cfg = load_config(args.overrides)
    if cfg.run.name is None:
        OmegaConf.update(cfg, "run.name", time.strftime("%Y%m%d-%H%M%S"))
    preflight(cfg)  # bad config or data fails here, before any stage starts
    if args.dry_run:
        out.print(OmegaConf.to_yaml(cfg))
        return 0
    run_pipeline(cfg)
    return 0


def cmd_presets(args) -> int:
    from rich.table import Table

    from compress.config import presets
    from compress.pipeline import STAGES

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

    from compress.artifact import write_json
    from compress.config import load_config
    from compress.data import load_splits
    from compress.results import table
    from compress.stages.evaluate import evaluate_folder
    from compress.validate import validate
    from teachers import loading

    cfg = load_config(args.overrides)
    validate(cfg)
    model_cfg = OmegaConf.merge(cfg.teacher, _model_source(args.model))
    splits = load_splits(cfg.data)
    folder = loading.resolve(model_cfg, "teacher")
    record = evaluate_folder(folder, model_cfg, "teacher", splits, cfg)
    record.pop("predictions", None)
    record = {"stage": "eval", "role": "model", "model": args.model, "backend": "torch", "path": str(folder),
              **record}
    out.print(table([record], title=f"eval: {args.model} on {cfg.data.name}"))
    if args.out:
        write_json(Path(args.out), {"records": [record]})
    return 0


def _model_source(spec: str) -> dict:
    """MODEL as a stage folder (its model/), a model folder, a .gguf file, or a hub id."""
    path = Path(spec).expanduser()
    source = {"name": spec, "random": None, "gguf_package": None, "gguf_file": None, "hub_id": None, "path": None}
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


COMMANDS = {  # name: (function, one-line help)
    "run": (cmd_run, "run a pipeline of stages (default: the embedded SmolLM2 job) and report every stage"),
    "presets": (cmd_presets, "list every config group option and every stage, one line each"),
    "eval": (cmd_eval, "evaluate one model (folder, run stage folder, .gguf file or hub id) on a task"),
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
        if name == "run":
            sp.add_argument("--dry-run", action="store_true", help="print the composed config and stop")
        if name in ("run", "eval"):
            sp.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=OVERRIDES_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    _quiet()
    try:
        return COMMANDS[args.command][0](args)
    except CompressError as e:
        console.print(f"[bold red]error:[/] {e.render()}", highlight=False, soft_wrap=True)
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
