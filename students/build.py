"""Student construction: a model of its own, or the teacher cut to a subset of its layers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from compress.errors import CompressError, Problem
from compress.hub import build_once, cache_root, text_hash
from teachers import loading


def resolve(cfg, teacher_dir: Path, dest: Path | None = None) -> Path:
    """A local folder holding the student `cfg` describes.

    A student derived from the teacher is built into `dest`, or when `dest` is None into
    the cache (keyed by the teacher folder and the kept layers).
    """
    if cfg.from_teacher and not cfg.path:
        return derive_from_teacher(teacher_dir, cfg, dest)
    return loading.resolve(cfg, "student")


def kept_layers(cfg, num_layers: int) -> list[int]:
    """Teacher layer indices the student keeps: `keep_layers`, else 0, k, 2k, ..."""
    layers = list(cfg.keep_layers) if cfg.keep_layers else list(range(0, num_layers, cfg.keep_every))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers) or not layers:
        raise CompressError(Problem("student.keep_layers", layers, f"need distinct layer indices in "
                                    f"[0, {num_layers - 1}] (the teacher has {num_layers} layers)"))
    return sorted(layers)


def derive_from_teacher(teacher_dir: Path, cfg, dest: Path | None = None) -> Path:
    """Copy embeddings, final norm, head and the kept decoder layers (renumbered) into a new folder."""
    from safetensors.torch import load_file, save_file

    config = json.loads((teacher_dir / "config.json").read_text())
    layers = kept_layers(cfg, config["num_hidden_layers"])

    def build(tmp: Path) -> None:
        renumber = {old: new for new, old in enumerate(layers)}
        state = {}
        for f in sorted(teacher_dir.glob("*.safetensors")):
            for name, tensor in load_file(f).items():
                new_name = _renumber(name, renumber)
                if new_name is not None:
                    state[new_name] = tensor.contiguous()
        if not any(".layers." in k for k in state):
            raise CompressError(Problem("student.from_teacher", True, "the teacher's decoder layers are not "
                                        "named `model.layers.N`; derive-from-teacher supports Llama-style "
                                        "models only: choose a student preset with its own weights"))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config["num_hidden_layers"] = len(layers)
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = [config["layer_types"][i] for i in layers]
        config["compress_kept_layers"] = layers
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in teacher_dir.iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "generation_config",
                                                   "chat_template", "vocab", "merges"))):
                shutil.copy2(f, tmp / f.name)

    if dest is not None:  # built once: a resumed stage, or another rank, finds it complete
        return build_once(dest, build)
    key = text_hash(json.dumps([loading.folder_fingerprint(teacher_dir), layers]))[:16]
    return build_once(cache_root() / "students" / f"{teacher_dir.name}-L{len(layers)}-{key}", build)


def _renumber(name: str, renumber: dict[int, int]) -> str | None:
    """`model.layers.6.mlp...` -> `model.layers.2.mlp...`; None for a dropped layer."""
    parts = name.split(".")
    if "layers" not in parts:
        return name
    i = parts.index("layers") + 1
    old = int(parts[i])
    if old not in renumber:
        return None
    parts[i] = str(renumber[old])
    return ".".join(parts)
