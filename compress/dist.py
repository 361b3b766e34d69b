"""Which process of a multi-process (DDP / FSDP / DeepSpeed) run this is.

Rank 0 owns the run folder: it takes the lock, runs every stage, writes every artifact.
Other ranks (started by Lightning's launcher, torchrun or SLURM) follow the pipeline: they
skip finished stages, wait for rank 0, and join the training stages' `trainer.fit` only.
"""
from __future__ import annotations

import os


def rank() -> int:
    """Global rank from the launcher's environment; 0 when not distributed."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    if local.isdigit() and node.isdigit() and (int(local) or int(node)):
        return int(node) * 1000 + int(local)  # Lightning's launcher: only "is it 0" matters here
    return 0


def is_follower() -> bool:
    return rank() != 0


def launched_externally() -> bool:
    """Started by torchrun or SLURM with several processes (every rank runs `compress run`)."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1) > 1
