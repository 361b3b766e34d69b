"""`<run>/results.json`: one record per stage and model, rebuilt from the stage folders."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
from rich.table import Table

from compress.artifact import Artifact, versions, write_json

COLUMNS = [  # (record key, header, format)
    ("stage", "stage", "{}"), ("role", "model", "{}"), ("backend", "backend", "{}"),
    ("accuracy", "acc", "{:.3f}"), ("retention", "retention", "{:.3f}"), ("retention_base", "ret. base", "{:.3f}"), ("agreement", "agree", "{:.3f}"),
    ("perplexity", "ppl", "{:.2f}"), ("prefill_ms", "prefill ms", "{:.1f}"), ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("size_mb", "size MB", "{:.1f}"), ("params", "params M", "{:.2f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
]


def hardware() -> dict:
    info = {"machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": None}
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
    """Header (hardware, versions) and the records of every finished stage, in pipeline order."""
    records = []
    for d in stage_dirs:
        if (d / "DONE").exists():
            records += Artifact.load(d).metrics().get("records", [])
    return {"header": {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "hardware": hardware(),
                       "versions": versions()}, "records": records}


def write(run_dir: Path, results: dict) -> Path:
    path = run_dir / "results.json"
    write_json(path, results)
    return path


def table(records: list[dict], title: str = "results") -> Table:
    t = Table(title=title)
    for _, header, _ in COLUMNS:
        t.add_column(header, justify="left" if header in ("stage", "model", "backend") else "right")
    for r in records:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            if key == "role":
                v = f"{r.get('role')}:{r.get('model')}"
            if key == "params" and v is not None:
                v = v / 1e6
            cells.append("-" if v is None else fmt.format(v))
        t.add_row(*cells)
    return t
