"""Scale through Lightning: the distill stage with DDP on CPU (2 processes, gloo) follows the
single-process loss curve for the same global batch."""
import csv
import shutil

import pytest

from conftest import TINY, cli

BASE = TINY + ["pipeline.stages=[evaluate,distill]", "distill=quick", "distill.max_steps=8", "trainer.log_every=1",
               "trainer.progress_bar=false", "eval.latency=false", "eval.perplexity=false", "trainer.accelerator=cpu"]


def _curve(run) -> list[float]:
    rows = list(csv.DictReader((run / "01_distill" / "logs" / "metrics.csv").open()))
    return [float(r["train/loss_global"]) for r in rows if r.get("train/loss_global")]


@pytest.mark.slow
def test_ddp_on_cpu_matches_one_process_with_the_same_global_batch(tmp_path):
    one = cli("run", *BASE, "distill.batch_size=8", f"run.root={tmp_path}", "run.name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    (tmp_path / "ddp").mkdir()  # the evaluate stage does not depend on the trainer: reuse it
    shutil.copytree(tmp_path / "one" / "00_evaluate", tmp_path / "ddp" / "00_evaluate")
    ddp = cli("run", *BASE, "trainer=ddp-cpu", "distill.batch_size=4", f"run.root={tmp_path}", "run.name=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "00_evaluate: up to date, skipped" in ddp.stderr
    a, b = _curve(tmp_path / "one"), _curve(tmp_path / "ddp")
    assert len(a) == len(b) == 8
    print("one process:", [round(x, 4) for x in a], "\nddp x2:     ", [round(y, 4) for y in b])
    # Each rank averages the loss over its own tokens and DDP averages the ranks, while one process
    # averages over all tokens of the batch: equal up to how tokens split between ranks.
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=0.01), (a, b)  # measured: equal to 4 decimals
    assert (tmp_path / "ddp" / "01_distill" / "DONE").exists() and not (tmp_path / "ddp" / ".lock").exists()
