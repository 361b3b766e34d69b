import json

import pytest

from compress.config import load_config
from compress.data import load_splits, truncate
from compress.errors import CompressError
from conftest import FEVER, RT_CSV, SQUAD


def _data(*overrides):
    return load_config(list(overrides)).data


def test_rotten_tomatoes_splits_are_disjoint_sized_and_seeded():
    cfg = _data(f"data.path={RT_CSV}", "data.eval_size=300", "data.train_size=200", "data.unlabeled_size=100")
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.sizes() == {"train": 200, "unlabeled": 100, "eval": 300, "perplexity": 300}
    assert [e.text for e in a.eval] == [e.text for e in b.eval]  # same seed, same split
    assert not {e.text for e in a.eval} & {e.text for e in a.train}
    assert all(e.label is None for e in a.unlabeled)
    assert {e.label for e in a.eval} == {"fresh", "rotten"}  # `plot` rows dropped
    assert a.verbalizers == {"fresh": " positive", "rotten": " negative"}
    other = load_splits(_data(f"data.path={RT_CSV}", "data.eval_size=300", "data.seed=7"))
    assert [e.text for e in other.eval] != [e.text for e in a.eval]


def test_bundled_rotten_tomatoes_is_the_offline_fallback():
    splits = load_splits(_data("data.eval_size=10", "data.train_size=10", "data.unlabeled_size=10"))
    assert len(splits.eval) == 10


def test_bigbench_task_json_labels_from_target_scores():
    cfg = _data("data=bigbench", f"data.path={FEVER}", "data.eval_size=50", "data.train_size=50",
                "data.unlabeled_size=0")
    s = load_splits(cfg)
    assert set(s.verbalizers) == {"true", "false"} and s.verbalizers["true"] == " true"
    raw = json.loads(FEVER.read_text())["examples"]
    gold = {truncate(ex["input"], cfg.max_chars): max(ex["target_scores"], key=ex["target_scores"].get)
            for ex in raw}
    assert all(gold[e.text] == e.label for e in s.eval)


def test_jsonl_with_custom_fields_and_verbalizers(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"review": f"text {i}", "stars": "good" if i % 2 else "bad"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _data("data=jsonl", f"data.path={path}", "data.text_field=review", "data.label_field=stars",
                "data.verbalizers={good: ' yes', bad: ' no'}", "data.eval_size=10", "data.train_size=10",
                "data.unlabeled_size=10")
    s = load_splits(cfg)
    assert s.verbalizers == {"good": " yes", "bad": " no"} and len(s.train) == 10


def test_text_format_is_perplexity_only():
    s = load_splits(_data("data=text", f"data.path={SQUAD}"))
    assert s.verbalizers == {} and len(s.perplexity) == 200 and s.train == []


def test_truncate_cuts_at_a_word_boundary():
    assert truncate("one two three", 8) == "one two"
    assert truncate("  a\n b ", 10) == "a b"


@pytest.mark.parametrize("rows, override, needle", [
    ([{"text": "x", "label": "a"}] * 5, "data.label_field=stars", "data.label_field='stars'"),
    ([{"text": "x", "label": "a"}] * 5, "data.text_field=body", "data.text_field='body'"),
    ([{"text": "x", "label": "a"}] * 5, "data.eval_size=2", "only one class"),
    ([{"text": "x", "label": "a"}, {"text": "y", "label": "b"}] * 3, "data.verbalizers={a: ' A'}",
     "labels with no verbalizer: ['b']"),
    ([], "data.eval_size=2", "no examples"),
])
def test_bad_data_names_the_key(tmp_path, rows, override, needle):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _data("data=jsonl", f"data.path={path}", "data.eval_size=2", "data.train_size=0",
                "data.unlabeled_size=0", override)
    with pytest.raises(CompressError) as e:
        load_splits(cfg)
    assert needle in e.value.render()


def test_sizes_larger_than_the_data():
    with pytest.raises(CompressError) as e:
        load_splits(_data(f"data.path={RT_CSV}", "data.eval_size=100000"))
    assert "data.eval_size" in e.value.render() and "lower the sizes" in e.value.render()


def test_split_sizes_fit_the_data_and_the_pipeline():
    from compress.data import fit_sizes

    cfg = _data(f"data.path={RT_CSV}")  # preset sizes: 500 eval, 2,000 train, 3,600 unlabeled
    assert fit_sizes(cfg, 2289, trains=False, given=set()) == (
        {"eval_size": 500, "train_size": 0, "unlabeled_size": 0}, "this pipeline trains nothing: no train or "
        "unlabeled split")  # a BIG-bench task of 2,289 examples, evaluated
    sizes, note = fit_sizes(cfg, 2289, trains=True, given=set())
    assert sizes == {"eval_size": 187, "train_size": 750, "unlabeled_size": 1350} and "in proportion" in note
    sizes, _ = fit_sizes(cfg, 2289, trains=True, given={"eval_size"})
    assert sizes["eval_size"] == 500 and sum(sizes.values()) <= 2289  # what the user set is kept
    with pytest.raises(CompressError) as e:
        fit_sizes(cfg, 400, trains=False, given={"eval_size"})
    assert "data.eval_size" in e.value.render() and "400 examples" in e.value.render()
    assert fit_sizes(cfg, 10_000, trains=True, given=set()) == ({"eval_size": 500, "train_size": 2000,
                                                                  "unlabeled_size": 3600}, None)


def test_bigbench_task_smaller_than_the_presets_evaluates(tmp_path):
    """2,289 examples, pipeline=evaluate: no train split is needed, so all 500 eval examples are used."""
    from compress.cli import main

    rows = [{"input": f"claim {i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(2289)]
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"examples": rows}))
    args = ["run", "teacher=tiny-random", "student=tiny-random", "data=bigbench", f"data.path={task}", "eval=quick",
            "eval.latency=false", "eval.perplexity=false", "pipeline=evaluate", f"run.root={tmp_path}", "run.name=B"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "B" / "00_evaluate" / "metrics.json").read_text())
    assert metrics["splits"]["eval"] == 500 and metrics["splits"]["train"] == 0
