"""The table users will quote: the whole default pipeline on the embedded model, every stage
evaluated the same way (accuracy, retention, decode tok/s and speed-up against the fp32
teacher measured in the same run, size, memory), plus report.md / report.png.

    python benchmarks/pipeline_tradeoff.py                       # `compress run` on the default job
    python benchmarks/pipeline_tradeoff.py run.name=tradeoff data.eval_size=200

OVERRIDEs are `compress run` overrides (default run.name: pipeline_tradeoff, so a rerun
resumes). Writes benchmarks/results/pipeline_tradeoff.json (header + records of results.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_and_record(overrides: list[str], out: Path, name: str) -> dict:
    """`compress run` with `overrides` (run.name defaults to `name`, so a rerun resumes); writes `out`:
    hardware (load average included), overrides, wall time and the run's results.json. Returns that."""
    sys.path.insert(0, str(ROOT))
    from compress.cli import _quiet
    from compress.config import given_keys, load_config
    from compress.console import say
    from compress.pipeline import preflight, run_pipeline
    from compress.results import hardware

    _quiet()
    overrides = overrides if any(o.startswith("run.name=") for o in overrides) else [f"run.name={name}", *overrides]
    cfg = load_config(overrides)
    preflight(cfg, given_keys(overrides))
    t0 = time.perf_counter()
    start = hardware()
    run = run_pipeline(cfg)  # prints the results table, writes results.json/csv and the report
    res = json.loads((run / "results.json").read_text())
    result = {"hardware": start, "load_average_end": hardware()["load_average"], "run": str(run),
              "overrides": overrides, "wall_s": time.perf_counter() - t0, "report": str(run / "report.md"), **res}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    say(f"wrote {out} (report: {run / 'report.md'}, {run / 'report.png'})")
    return result


def arguments(doc: str, name: str) -> argparse.Namespace:
    """`[--out JSON] [OVERRIDE...]` of a benchmark that runs a pipeline; --out defaults to results/NAME.json."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"{name}.json")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE")
    return p.parse_args()


def main() -> None:
    args = arguments(__doc__, "pipeline_tradeoff")
    run_and_record(args.overrides, args.out, "pipeline_tradeoff")


if __name__ == "__main__":
    main()
