"""Shared fixtures: an isolated model cache, no hub access, paths to the shared real data."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RT_CSV = DATA / "rotten_tomatoes_corpus_full.csv.bz2"
FEVER = DATA / "bigbench" / "fact_checker_fever.json"
SQUAD = DATA / "squad_dev_wiki_paragraphs.txt"

# Tests never reach a hub, and build models into their own cache (set before any import
# of compress so that subprocesses inherit it too). COMPRESS_TEST_CACHE keeps a cache
# across sessions (the GGUF conversion of the real model takes ~15 s).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["COMPRESS_CACHE"] = os.environ.get("COMPRESS_TEST_CACHE") or tempfile.mkdtemp(prefix="compress-cache-")
# Under xdist each worker (and every `compress` it starts) gets an equal share of the cores: two workers
# on 2 cores with 2 threads each would oversubscribe them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

TINY = ["teacher=tiny-random", "student=tiny-random", f"data.path={RT_CSV}", "data.eval_size=40",
        "data.train_size=40", "data.unlabeled_size=40", "eval=quick"]
"""Overrides for a fast run on tiny random models and real review data."""


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `compress` command as a user would; capture its output."""
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


@pytest.fixture(scope="session")
def tiny_cfg():
    from compress.config import load_config

    return load_config(TINY)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_cfg):
    from teachers import loading

    folder = loading.resolve(tiny_cfg.teacher, "teacher")
    model, tok = loading.load(folder, tiny_cfg.teacher, "teacher")
    return folder, model, tok
