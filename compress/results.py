"""`<run>/results.json` and `results.csv`: one record per stage, model and backend, rebuilt
from the stage folders.

Collecting puts every record on the same footing (`compress.records.relate`, the one place derived
figures are computed): `retention` is accuracy over the run's *reference teacher* (the last teacher
measured: the fine-tuned one when the pipeline fine-tunes), `retention_base` over the base teacher
of the `evaluate` stage, and `speedup` is decode tokens/s over that base (fp32 on CPU) teacher's,
measured in the same run. Each record keeps its per-example scores (`example_scores`), from which `relate`
computes the 95% bootstrap intervals of its primary metric (`score_ci`) and of retention (`retention_ci`,
paired with the reference teacher); the tables show them as `0.780 [0.744, 0.816]`.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path

from rich.table import Table

from compress.artifact import Artifact, versions, write_json
from compress.records import Record, relate

COLUMNS = [  # (record key, header, format)
    ("stage", "stage", "{}"), ("role", "model", "{}"), ("variant", "form", "{}"), ("backend", "backend", "{}"),
    ("accuracy", "acc", "{:.3f}"), ("exact_match", "EM", "{:.3f}"), ("f1", "F1", "{:.3f}"), ("retention", "retention", "{:.3f}"), ("retention_base", "ret. base", "{:.3f}"), ("agreement", "agree", "{:.3f}"),
    ("perplexity", "ppl", "{:.4g}"), ("perplexity_ratio", "ppl / teacher", "{:.3g}"), ("prefill_ms", "prefill ms", "{:.1f}"), ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("speedup", "speed up", "{:.2f}x"), ("size_mb", "size MB", "{:.1f}"), ("params", "params M", "{:.2f}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"), ("stage_wall_s", "stage s", "{:.0f}"),
]
CSV_FIELDS = ["stage", "role", "model", "variant", "output", "backend", "metric", "accuracy", "exact_match", "f1",
              "score_ci_low", "score_ci_high", "retention", "retention_ci_low", "retention_ci_high", "retention_base",
              "agreement", "perplexity", "perplexity_ratio", "prefill_ms", "decode_tok_s", "speedup", "size_mb",
              "params", "peak_mem_mb", "stage_wall_s", "path"]


def hardware() -> dict:
    import torch  # here, not at the top: `compress check` and `report` read results without torch

    info = {"machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": None,
            "load_average": os.getloadavg()}  # 1, 5, 15 min: speed figures from a busy machine mislead
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def collect(stage_dirs: list[Path]) -> dict:
    """Header (hardware, versions, reference teachers) and the records of every finished stage,
    in pipeline order, with retention and speed-up against this run's teachers."""
    records = []
    for d in stage_dirs:
        if (d / "DONE").exists():
            metrics = Artifact.load(d).metrics()
            for r in metrics.get("records", []):
                record = Record.from_dict(r)
                if record.stage_wall_s is None:
                    record.stage_wall_s = metrics.get("wall_s")
                records.append(record)
    header = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "hardware": hardware(), "versions": versions(),
              **relate(records)}
    return {"header": header, "records": [r.to_dict() for r in records]}


def write(run_dir: Path, results: dict) -> Path:
    """results.json (header + records) and results.csv (one row per record, no header record)."""
    path = run_dir / "results.json"
    write_json(path, results)
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, **_bounds(r, "score_ci"), **_bounds(r, "retention_ci")} for r in results["records"])
    return path


def _bounds(record: dict, key: str) -> dict:
    """An interval as two CSV columns, `<key>_low` and `<key>_high` (empty when there is none)."""
    low, high = record.get(key) or (None, None)
    return {f"{key}_low": low, f"{key}_high": high}


def load(run_dir: Path) -> dict:
    """A run's results.json; CompressError (exit 2) when the run or its results are missing."""
    from compress.errors import CompressError, Problem

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompressError(Problem("RUN", str(run_dir), "no such run folder: give `<run.root>/<run.name>`, "
                                    "e.g. runs/exp1"))
    path = run_dir / "results.json"
    if not path.is_file():
        raise CompressError(Problem("RUN", str(run_dir), "has no results.json: the run has not finished a stage "
                                    "yet; run `compress run ...` with the same run.name first"))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(Problem("RUN", str(path), f"is not valid JSON ({e}); rerun `compress run` to "
                                    "rebuild it")) from None


def record_path(run_dir: Path, path: str) -> Path:
    """A record's model path, found from any working directory: records made with a relative `run.root`
    hold paths relative to where the run was started (`runs/<name>/02_distill/model`)."""
    p, run_dir = Path(path), Path(run_dir)
    if p.is_absolute() or run_dir.name not in p.parts:
        return p
    return run_dir.joinpath(*p.parts[p.parts.index(run_dir.name) + 1:])


def interval_of(record: dict, key: str) -> list[float] | None:
    """The interval shown beside column `key`: score_ci beside the primary metric, retention_ci beside retention."""
    if key == record.get("metric", "accuracy"):
        return record.get("score_ci")
    return record.get("retention_ci") if key == "retention" else None


def with_interval(value: float, ci: list[float] | None, fmt: str = "{:.3f}", sep: str = " ") -> str:
    """`0.780 [0.744, 0.816]`; the value alone without an interval."""
    return fmt.format(value) + (f"{sep}[{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def cells(record: dict, sep: str = " ") -> list[str]:
    """One record formatted as the table's cells (COLUMNS order); '-' where not measured; the primary metric
    and retention with their 95% intervals, when the record has them (after `sep`)."""
    out = []
    for key, _, fmt in COLUMNS:
        v = record.get(key)
        if key == "role":
            v = f"{record.get('role')}:{record.get('model')}"
        if key == "variant" and not v:
            v = None
        if key == "params" and v is not None:
            v = v / 1e6
        out.append("-" if v is None else with_interval(v, interval_of(record, key), fmt, sep))
    return out


def shown(records: list[dict]) -> list[int]:
    """Indexes of the COLUMNS some record has a value for (a label task shows no EM / F1 column)."""
    rows = [cells(r) for r in records]
    return [i for i in range(len(COLUMNS)) if i < 3 or any(row[i] != "-" for row in rows)]


def table(records: list[dict], title: str = "results") -> Table:
    t = Table(title=title)
    keep = shown(records)
    rows = [cells(r, sep="\n") for r in records]  # an interval under its value: the console is narrow
    for i in keep:
        header = COLUMNS[i][1]
        text = header in ("stage", "model", "form", "backend")
        interval = any("\n" in row[i] for row in rows)  # kept whole: `[0.744, 0.816]`
        t.add_column(header, justify="left" if text else "right", overflow="fold", no_wrap=text or interval,
                     min_width=max(len(line) for row in rows for line in row[i].split("\n")) if interval else None)
    for row in rows:
        t.add_row(*[row[i] for i in keep])
    return t
