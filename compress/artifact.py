"""A stage's artifact: the folder it wrote, with `model/`, config.yaml, metrics.json,
manifest.json and a DONE marker written last."""
from __future__ import annotations

import json
import platform
import re
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PACKAGES = ("compress", "torch", "transformers", "peft", "bitsandbytes", "lightning", "datasets", "hydra-core",
            "optimum", "onnxruntime", "torch-pruning", "gptqmodel")
PARTIAL = "manifest-partial.json"
"""In an unfinished stage's temporary folder: the identity it is being made for (a rerun with the
same identity resumes it) and the current attempt (what other ranks join)."""
TRAINING = "trainer.json"
"""Written by rank 0 into the stage folder when it builds a Lightning Trainer: other ranks join then."""


@dataclass(frozen=True)
class Artifact:
    """What a stage hands the next one: its finished folder (None at the start of a run)."""

    path: Path | None
    manifest: dict

    @classmethod
    def start(cls) -> "Artifact":
        return cls(None, {"identity": "start"})

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        return cls(path, json.loads((path / "manifest.json").read_text()))

    @property
    def identity(self) -> str:
        """Hash of the stage name, its config and its input's identity: what decides a rerun."""
        return self.manifest["identity"]

    def teacher(self) -> dict:
        """The teacher role: the reference that agreement and retention are measured against
        (path, name, accuracy, base_accuracy, predictions)."""
        role = self._role("teacher")
        if role is None:
            raise RuntimeError(f"{self.path} records no teacher (an artifact of a pipeline that did not start with "
                               "`evaluate`; the pipeline's checks refuse that before any stage runs)")
        return role

    def student(self) -> dict | None:
        """The student role (path, name): the model the next stage compresses; None when none was made."""
        return self._role("student")

    def _role(self, name: str) -> dict | None:
        if self.path is None:  # the start of a run: no model yet
            return None
        metrics = self.metrics()
        role = metrics.get("roles", {}).get(name)
        if "roles" not in metrics:  # an artifact made before roles were explicit
            if name == "teacher" and "reference" in metrics:
                role = {**metrics["reference"], "path": metrics["reference"]["teacher"]}
            made_student = self.manifest.get("stage") in ("distill", "prune", "quantize")
            if name == "student" and made_student and (self.path / "model").is_dir():
                role = {"path": "model", "name": None}
        if role is None:
            return None
        return {**role, "path": str((self.path / role["path"]).resolve())}

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text()) if self.path else {}


def is_done(path: Path, identity: str) -> bool:
    """The folder is complete (DONE) and was made from the same config and input."""
    if not (path / "DONE").exists() or not (path / "manifest.json").exists():
        return False
    return json.loads((path / "manifest.json").read_text()).get("identity") == identity


def finish(tmp: Path, final: Path, metrics: dict, manifest: dict) -> None:
    """Write metrics and manifest, then DONE, then move the folder into place."""
    write_json(tmp / "metrics.json", metrics)
    write_json(tmp / "manifest.json", manifest)
    (tmp / "DONE").write_text("")
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)  # keep the previous result until the new one is in place
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data) -> None:
    """Write JSON through a temporary file so a crash never leaves half a file; a list of numbers (per-example
    scores) on one line."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_NUMBER_LIST.sub(_one_line, json.dumps(data, indent=2, default=str)))
    tmp.replace(path)


_NUMBER_LIST = re.compile(r"\[\n[\d\s.,eE+-]*\]")
"""An indented JSON list of numbers only (a string never holds a raw newline, so no string matches)."""


def _one_line(m: re.Match) -> str:
    return "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",")) + "]"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
