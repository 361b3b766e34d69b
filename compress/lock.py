"""One `compress run` at a time per run folder: `<run>/.lock` holds the owner's pid, host and start time.

A second run on the same folder stops with exit code 2 naming the holder. A lock whose pid
is dead (a run killed with SIGKILL, a crashed machine) is taken over with a warning.
The lock is released when the run ends, also on errors and Ctrl-C.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from compress.console import say
from compress.errors import CompressError, Problem

LOCK = ".lock"


def holder(run: Path) -> dict | None:
    """The lock's owner as written ({pid, host, started}), {} if unreadable, None if unlocked."""
    try:
        return json.loads((run / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def alive(owner: dict) -> bool:
    """Whether the lock's owner still runs. A pid on another host cannot be checked: assume it does."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return not _zombie(int(owner["pid"]))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@contextmanager
def run_lock(run: Path, name: str):
    """Hold `<run>/.lock` for the duration of the block."""
    path = run / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = holder(run)
            if owner is None:
                continue  # released in between: try again
            if owner == {} and time.time() - path.stat().st_mtime < 5:
                time.sleep(1)  # being written right now
                continue
            if owner and alive(owner):
                raise CompressError(Problem("run.name", name, f"the run folder {run} is in use by pid "
                                            f"{owner['pid']} on {owner['host']} (since {owner['started']}): "
                                            "wait for that run to end or stop it, or choose another run.name. "
                                            f"If no such process exists, delete {path}")) from None
            say(f"[yellow]warning:[/] taking over the stale lock {path} of pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')} (no longer running); resuming its run")
            try:
                os.rename(path, path.with_name(f"{LOCK}.stale-{os.getpid()}"))
                path.with_name(f"{LOCK}.stale-{os.getpid()}").unlink()
            except FileNotFoundError:
                pass  # another process took it over first: the next attempt sees its lock
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise CompressError(Problem("run.name", name, f"could not take the lock {path}; another compress run "
                                    "keeps changing it: choose another run.name"))
    try:
        yield
    finally:
        if holder(run) == me:
            path.unlink(missing_ok=True)
