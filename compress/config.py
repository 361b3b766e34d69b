"""Compose a job config from the shipped config groups and command-line overrides.

Hydra's compose API does the work; this module turns its exceptions into
`Problem`s that name the key, the bad value and the fix, and reports every bad
override at once instead of the first one.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from importlib import resources
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from compress import schema
from compress.errors import CompressError, Problem


def config_dir() -> Path:
    """The config groups shipped inside the package (`configs/` in the repository)."""
    return Path(str(resources.files("compress.configs")))


def presets() -> dict[str, dict[str, str]]:
    """{group: {option: description}} read from the shipped YAML files."""
    out: dict[str, dict[str, str]] = {}
    for group in schema.GROUPS:
        options = {}
        for f in sorted((config_dir() / group).glob("*.yaml")):
            options[f.stem] = (yaml.safe_load(f.read_text()) or {}).get("description", "")
        out[group] = options
    return out


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `config.yaml` with `overrides`; raise CompressError listing every bad one."""
    overrides = list(overrides)
    bad = _check_overrides(overrides)
    maps = {o: _map_value(o) for o in overrides if o not in bad and o.split("=", 1)[0] in MAP_FIELDS}
    ok = [o for o in overrides if o not in bad and o not in maps]
    try:
        cfg = _compose(ok)
        with open_dict(cfg):
            for o, value in maps.items():
                OmegaConf.update(cfg, o.split("=", 1)[0], value, merge=False)
    except Exception as e:  # an override broke composition: find every one that does
        problems = [p for o in ok for p in _problems_of(o, ok)]
        bad.update({"": Problem("overrides", ok, _hydra_message(e))} if not problems else
                   {str(i): p for i, p in enumerate(problems)})
    if bad:
        raise CompressError(list(bad.values()), "bad overrides")
    _name_models(cfg, given_keys(overrides))
    return cfg


def given_keys(overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The keys a user set on the command line (`data.eval_size=100` -> `data.eval_size`)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def model_name(path: str | Path) -> str:
    """What a user calls a model given by path: a GGUF file's `general.name`, else the folder's name (for a
    run's stage folder, `run/stage`)."""
    path = Path(path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        try:
            from gguf import GGUFReader

            field = GGUFReader(path).fields.get("general.name")
            if field is not None:
                return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        except Exception:  # an unreadable file fails later, where it is loaded, with a clear message
            pass
        return path.stem
    path = path.resolve()
    return f"{path.parent.parent.name}/{path.parent.name}" if path.name == "model" else path.name


def _name_models(cfg, given: set[str]) -> None:
    """A model given by `teacher.path=` / `student.path=` is called after its file or folder (unless
    `*.name=` was given too), in every log line, record and plot; a student cut from such a teacher is
    `<teacher>-slim`."""
    with open_dict(cfg):
        for role in ("teacher", "student"):
            if cfg[role].path and f"{role}.name" not in given:
                cfg[role].name = model_name(cfg[role].path)
        if "teacher.path" in given and cfg.student.from_teacher and not cfg.student.path \
                and "student.name" not in given:
            cfg.student.name = f"{cfg.teacher.name}-slim"


MAP_FIELDS = ("data.verbalizers",)
"""Mapping fields that an override replaces as a whole, e.g. data.verbalizers={pos: ' yes', neg: ' no'}."""


def _map_value(override: str) -> dict:
    (ov,) = OverridesParser.create().parse_overrides([override])
    value = ov.value()
    if not isinstance(value, dict):
        raise CompressError(Problem(ov.key_or_group, value, "expected a mapping such as {label: ' word', ...}"))
    return {str(k): str(v) for k, v in value.items()}


def _compose(overrides: list[str]) -> DictConfig:
    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="compress"):
        return compose("config", overrides=overrides)


def _check_overrides(overrides: list[str]) -> dict[str, Problem]:
    """Syntax and group-option checks that need no composition: {override: problem}."""
    problems, parser, options = {}, OverridesParser.create(), presets()
    for o in overrides:
        try:
            (ov,) = parser.parse_overrides([o])
        except Exception as e:
            problems[o] = Problem(o, o, f"not an override ({_hydra_message(e)}); write key=value, "
                                        "e.g. data.eval_size=200")
            continue
        key, value = ov.key_or_group, ov.get_value_element_as_str() if not ov.is_delete() else None
        if key in options and value is not None and value not in options[key]:
            problems[o] = Problem(key, value, f"no such {key} preset; choose one of: "
                                              f"{', '.join(options[key])}" + _did_you_mean(value, options[key]))
        elif ov.is_add() or ov.is_force_add() or ov.is_delete():
            problems[o] = Problem(o.split("=", 1)[0], value, "adding or deleting keys is not supported: every "
                                  "key is declared in the schema (compress/schema.py); write key=value")
    return problems


def _problems_of(override: str, all_overrides: list[str]) -> list[Problem]:
    """Compose with the group selections plus this one override; translate its failure."""
    groups = [o for o in all_overrides if o.split("=", 1)[0] in schema.GROUPS]
    try:
        _compose(groups + ([override] if override not in groups else []))
        return []
    except Exception as e:
        key, _, value = override.partition("=")
        return [_translate(key, value, e)]


def _translate(key: str, value: str, e: Exception) -> Problem:
    msg = _hydra_message(e)
    if "not in" in msg or "Could not override" in msg or "Key '" in msg:
        parent, _, leaf = key.rpartition(".")
        valid = _keys_of(parent)
        if valid is not None and leaf not in valid:
            return Problem(key, value, f"unknown key; valid keys under `{parent or 'the root'}`: "
                                       f"{', '.join(valid)}" + _did_you_mean(leaf, valid))
    if "NoneType" in msg:
        parent = key.rpartition(".")[0]
        return Problem(key, value, f"`{parent}` is null in the selected preset, so it has no keys to set; "
                                   "choose a preset that defines it (see `compress presets`)")
    m = re.search(r"could not be converted to (\w+)", msg)
    if m:
        return Problem(key, value, f"expected a value of type {m.group(1)}")
    return Problem(key, value, msg)


def _keys_of(dotted: str) -> list[str] | None:
    """Field names of the schema dataclass at `dotted` ('' is the root), or None if not a node."""
    cls = schema.Config
    for part in filter(None, dotted.split(".")):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = next((a for a in (hints[part], *typing.get_args(hints[part])) if dataclasses.is_dataclass(a)), None)
        if cls is None:
            return None
    return [f.name for f in dataclasses.fields(cls)]


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _hydra_message(e: BaseException) -> str:
    """The first informative line of a Hydra/OmegaConf error, without 'full_key' noise."""
    while e.__cause__ is not None and str(e.__cause__):
        e = e.__cause__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key", "object_type", "reference_type"))]
    return lines[0] if lines else type(e).__name__
