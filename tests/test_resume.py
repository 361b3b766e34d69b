"""Crash and resume, and one run at a time per run folder: real `compress run` processes."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import TINY, cli

COMMON = TINY + ["trainer.checkpoint_every=5", "trainer.log_every=1", "trainer.progress_bar=false",
                 "eval.latency=false", "eval.perplexity=false"]
KILL = COMMON + ["pipeline.stages=[evaluate,distill]", "distill=quick", "distill.max_steps=40"]
"""Evaluate, then 40 distillation steps on tiny models with a checkpoint every 5 steps."""
STAGES = {  # stage: (overrides, the trained weights it saves)
    "distill": (KILL, "model/model.safetensors"),
    "finetune_teacher": (COMMON + ["pipeline.stages=[evaluate,finetune_teacher]", "finetune=quick",
                                   "finetune.max_steps=40", "teacher.method=lora", "teacher.lora.dropout=0.1"],
                         "adapter/adapter_model.safetensors"),  # LoRA dropout: the RNG state must resume too
}


def _start(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compress", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _steps(path) -> list[int]:
    return sorted(int(p.stem.split("step=")[1]) for p in path.glob("epoch=*-step=*.ckpt")) if path.exists() else []


@pytest.mark.parametrize("stage", STAGES)
def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(tmp_path, stage):
    overrides, weights = STAGES[stage]
    ref = cli("run", *overrides, f"run.root={tmp_path}", "run.name=ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    run.mkdir()  # the evaluate stage is the same: reuse it (the kill happens in the training stage)
    shutil.copytree(tmp_path / "ref" / "00_evaluate", run / "00_evaluate")
    ckpts = run / f".01_{stage}.tmp" / "checkpoints"
    kill_after = random.choice(range(10, 35, 5))  # a random checkpoint past the first one
    proc = _start("run", *overrides, f"run.root={tmp_path}", "run.name=killed")
    deadline = time.time() + 120
    while not any(s >= kill_after for s in _steps(ckpts)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / f"01_{stage}").exists() and (run / "00_evaluate" / "DONE").exists()
    saved = (run / "00_evaluate" / "manifest.json").read_text()
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # left behind by the kill

    again = cli("run", *overrides, f"run.root={tmp_path}", "run.name=killed")
    assert again.returncode == 0, again.stderr[-3000:]
    err = again.stderr
    assert "taking over the stale lock" in err and f"pid {proc.pid}" in err
    assert "00_evaluate: up to date, skipped" in err and f"resuming the unfinished 01_{stage}" in err
    assert (run / "00_evaluate" / "manifest.json").read_text() == saved  # the finished stage was not touched
    assert not (run / ".lock").exists() and not (run / f"01_{stage}" / "checkpoints").exists()

    # Same seed, same data order per step, optimizer/scheduler/RNG restored: the same student.
    a = load_file(tmp_path / "ref" / f"01_{stage}" / weights)
    b = load_file(run / f"01_{stage}" / weights)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text())["records"][-1] for n in ("ref", "killed"))
    for key in ("accuracy", "agreement", "retention"):
        assert ra[key] == pytest.approx(rb[key], abs=1e-6), key


def test_second_run_on_a_locked_folder_exits_2_naming_the_holder(tmp_path):
    run = tmp_path / "N"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from compress.lock import run_lock\n"
         "with run_lock(Path(sys.argv[1]), 'N'):\n    print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = cli("run", *KILL, f"run.root={tmp_path}", "run.name=N")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"in use by pid {holder.pid}" in proc.stderr and "run.name='N'" in proc.stderr
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_released_on_error_and_stale_lock_taken_over(tmp_path):
    from compress.lock import holder, run_lock

    with pytest.raises(RuntimeError):
        with run_lock(tmp_path, "N"):
            assert holder(tmp_path)["pid"] == os.getpid()
            raise RuntimeError("boom")
    assert holder(tmp_path) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                "started": "then"}))
    with run_lock(tmp_path, "N"):
        assert holder(tmp_path)["pid"] == os.getpid()
    assert holder(tmp_path) is None
