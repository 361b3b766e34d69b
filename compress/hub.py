"""Whether the Hugging Face Hub can be reached, and where compress caches what it builds."""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's endpoint does not answer within `timeout_s`."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    import requests

    try:
        requests.head(constants.ENDPOINT, timeout=timeout_s)
        return True
    except requests.RequestException:
        return False


def cache_root() -> Path:
    """`$COMPRESS_CACHE`, else `$XDG_CACHE_HOME/compress`, else `~/.cache/compress`."""
    if os.environ.get("COMPRESS_CACHE"):
        return Path(os.environ["COMPRESS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_once(final: Path, build) -> Path:
    """Return `final`, building it first with `build(tmp_folder)` if it is not complete.

    The folder is built under a temporary name and renamed when complete, with a
    `DONE` marker inside, so a crash never leaves a half-written folder behind
    under the final name, and two processes building the same folder do not clash.
    """
    import shutil

    if (final / "DONE").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / "DONE").write_text("")
        if final.exists() and not (final / "DONE").exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / "DONE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
