"""Multiple choice whose choices differ per example: BIG-bench `target_scores` with per-example keys and
jsonl with `data.choices_field`, read, scored over each example's own choices, and run end to end."""
import json
import math

import pytest
import torch

from compress.cli import main
from compress.config import load_config
from compress.data import Example, Splits, load_splits
from compress.errors import CompressError
from compress.evaluate import choice_logprobs, encode_requests, score_accuracy, torch_logits_fn
from conftest import FEVER

POOL = ["a", "b", "c", "d", "7", "red", "blue", "green apple", "dark violet", "x y z", "no", "maybe"]
"""Choice names: byte-level tokens make " a" 2 tokens and " green apple" 12."""

FAST = ["teacher=tiny-random", "student=tiny-random", "eval=quick", "eval.latency=false", "eval.perplexity=false",
        "trainer.progress_bar=false"]


def _own_choices(i: int) -> list[str]:
    """3 or 4 choices, different from one example to the next."""
    k = 3 + i % 2
    return [POOL[(i * 5 + j * 3) % len(POOL)] for j in range(k)]


def _bigbench_task(tmp_path, n: int = 60):
    examples = []
    for i in range(n):
        choices = _own_choices(i)
        best = i % len(choices)
        examples.append({"input": f"question {i}: which one?",
                         "target_scores": {c: int(j == best) for j, c in enumerate(choices)}})
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "per_example", "examples": examples}))
    return path, {e["input"]: list(e["target_scores"]) for e in examples}


def _data(*overrides):
    return load_config(list(overrides)).data


# --------------------------------------------------------------------------- reading


def test_bigbench_with_per_example_choices(tmp_path):
    path, choices = _bigbench_task(tmp_path)
    s = load_splits(_data("data=bigbench", f"data.path={path}", "data.eval_size=20", "data.train_size=20",
                          "data.unlabeled_size=20"))
    assert s.verbalizers == {} and s.labelled
    for e in s.eval + s.train:
        assert list(e.choices) == choices[e.text] and e.label in e.choices
        assert s.continuations(e) == {c: f" {c}" for c in e.choices}
        assert s.answer(e) == f" {e.label}"
    # the unlabeled split: labels hidden, choices kept
    assert all(e.label is None and list(e.choices) == choices[e.text] for e in s.unlabeled)
    # a verbalizer given for a choice is used for that choice wherever it appears
    s = load_splits(_data("data=bigbench", f"data.path={path}", "data.eval_size=20", "data.train_size=0",
                          "data.unlabeled_size=0", "data.verbalizers={red: ' crimson'}"))
    e = next(e for e in s.eval if "red" in e.choices)
    assert s.continuations(e) == {c: " crimson" if c == "red" else f" {c}" for c in e.choices}


def test_fever_keeps_its_shared_verbalizers():
    """Every FEVER example has the keys {true, false}: one shared label set, as before per-example choices."""
    s = load_splits(_data("data=bigbench", f"data.path={FEVER}", "data.eval_size=50", "data.train_size=50",
                          "data.unlabeled_size=50"))
    assert list(s.verbalizers.items()) == [("false", " false"), ("true", " true")]  # sorted, as before
    assert s.labels == ["false", "true"]
    assert all(e.choices is None for e in s.eval + s.train + s.unlabeled)
    assert all(s.continuations(e) == s.verbalizers for e in s.eval)
    assert [s.answer(e) for e in s.train] == [s.verbalizers[e.label] for e in s.train]


def test_jsonl_choices_field_label_as_text_or_index(tmp_path):
    rows = [{"q": f"q{i}", "options": _own_choices(i), "answer": (i % 3) if i % 2 else _own_choices(i)[i % 3]}
            for i in range(30)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = load_splits(_data("data=jsonl", f"data.path={path}", "data.text_field=q", "data.label_field=answer",
                          "data.choices_field=options", "data.eval_size=10", "data.train_size=10",
                          "data.unlabeled_size=10"))
    gold = {r["q"]: _own_choices(int(r["q"][1:]))[int(r["q"][1:]) % 3] for r in rows}
    assert all(e.label == gold[e.text] and list(e.choices) == _own_choices(int(e.text[1:])) for e in s.eval + s.train)


@pytest.mark.parametrize("rows, extra, needles", [
    ([{"text": f"t{i}", "opts": ["a", "b"], "label": "c" if i == 3 else "a"} for i in range(8)], [],
     ["data.label_field='label'", "example 4: 'c' not in ['a', 'b']", "0-based index"]),
    ([{"text": f"t{i}", "opts": ["a"] if i in (2, 5) else ["a", "b"], "label": "a"} for i in range(8)], [],
     ["data.choices_field='opts'", "2 example(s)", "[3, 6]", "at least two distinct"]),
    ([{"text": f"t{i}", **({} if i == 1 else {"opts": ["a", "b"]}), "label": 9 if i == 4 else "a"} for i in range(8)],
     [], ["data.choices_field='opts'", "examples [2]", "None", "data.label_field='label'", "example 5: '9'"]),
    ([{"text": f"t{i}", "opts": ["a", " "] if i == 0 else ["a", "a"] if i == 1 else ["a", "b"], "label": "a"}
      for i in range(8)], [], ["data.choices_field='opts'", "2 example(s)", "[1, 2]", "non-empty"]),
    ([{"text": "t", "label": "a"}] * 3, [], ["data.choices_field='opts'", "no such field"]),
    ([{"text": f"t{i}", "opts": ["a", "b"], "label": "a"} for i in range(8)], ["data=bigbench"],
     ["data.choices_field='opts'", "jsonl or csv files only"]),
])
def test_bad_choices_name_every_problem(tmp_path, rows, extra, needles):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if extra:  # a config problem: reported by the shared checks
        from compress.validate import problems
        msg = " ".join(str(p) for p in problems(load_config([*extra, f"data.path={path}", "data.choices_field=opts"])))
    else:
        with pytest.raises(CompressError) as e:
            load_splits(_data("data=jsonl", f"data.path={path}", "data.choices_field=opts", "data.eval_size=2",
                              "data.train_size=0", "data.unlabeled_size=0"))
        msg = " ".join(e.value.render().split())
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_bigbench_example_with_one_choice_is_named(tmp_path):
    path, _ = _bigbench_task(tmp_path, 10)
    task = json.loads(path.read_text())
    task["examples"][6]["target_scores"] = {"only": 1}
    path.write_text(json.dumps(task))
    with pytest.raises(CompressError) as e:
        load_splits(_data("data=bigbench", f"data.path={path}", "data.eval_size=2", "data.train_size=0",
                          "data.unlabeled_size=0"))
    msg = " ".join(e.value.render().split())
    assert f"data.path='{path}'" in msg and "examples [7]" in msg and "target_scores" in msg


# --------------------------------------------------------------------------- scoring


def _reference(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of log p(token | everything before it) over the continuation, from the model's logits in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def test_scores_over_each_examples_own_choices_match_a_float64_reference(tiny_teacher, tiny_cfg):
    _, model, tok = tiny_teacher
    eval_ = [Example("the sky is", "blue", ("red", "blue", "green apple")),
             Example("one plus six is", "7", ("7", "a", "b", "dark violet")),
             Example("pick one", "no", ("maybe", "no"))]
    splits = Splits(train=[], unlabeled=[], eval=eval_, perplexity=[], verbalizers={})
    out = score_accuracy(torch_logits_fn(model), tok, splits, tiny_cfg.data, batch_size=3)
    from compress.evaluate import build_prompt

    chat = bool(tiny_cfg.data.use_chat_template and tok.chat_template)
    prompts = [build_prompt(tok, e.text, tiny_cfg.data) for e in eval_]
    requests = encode_requests(tok, prompts, [[f" {c}" for c in e.choices] for e in eval_], chat)
    assert [len(c) for _, c in requests] == [3, 4, 2] and any(len(t) == 2 for _, c in requests for t in c)
    scores = choice_logprobs(torch_logits_fn(model), requests, batch_size=2, pad_id=tok.pad_token_id)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    for i, (ctx, conts) in enumerate(requests):
        ref = [_reference(model, ctx, c) for c in conts]
        for j, r in enumerate(ref):
            assert math.isclose(scores[i, j].item(), r, rel_tol=1e-4, abs_tol=1e-4), (i, j)
        assert torch.isinf(scores[i, len(conts):]).all() and (scores[i, len(conts):] < 0).all()  # padding
        assert out["predictions"][i] == eval_[i].choices[max(range(len(ref)), key=ref.__getitem__)]
    assert out["accuracy"] == sum(p == e.label for p, e in zip(out["predictions"], eval_)) / 3


def test_single_token_fast_path_with_different_numbers_of_choices(tiny_teacher):
    _, model, tok = tiny_teacher
    requests = [(tok("abc")["input_ids"], [[10], [20], [30]]), (tok("de")["input_ids"], [[40], [50]]),
                (tok("fghij")["input_ids"], [[60], [70], [80], [90]])]
    fast = choice_logprobs(torch_logits_fn(model), requests, batch_size=2, pad_id=tok.pad_token_id)
    for i, (ctx, conts) in enumerate(requests):
        ref = torch.tensor([_reference(model, ctx, c) for c in conts], dtype=torch.float32)
        assert torch.allclose(fast[i, : len(conts)], ref, atol=1e-4)
        assert torch.isneginf(fast[i, len(conts):]).all()


# --------------------------------------------------------------------------- end to end


def test_bigbench_per_example_choices_evaluate_then_distill(tmp_path):
    path, choices = _bigbench_task(tmp_path)
    base = [*FAST, "data=bigbench", f"data.path={path}", f"run.root={tmp_path}"]
    assert main(["run", *base, "pipeline=evaluate", "run.name=E"]) == 0
    stage = tmp_path / "E" / "00_evaluate"
    records = json.loads((tmp_path / "E" / "results.json").read_text())["records"]
    assert all(0 <= r["accuracy"] <= 1 for r in records)
    preds = json.loads((stage / "predictions.json").read_text())
    assert len(preds["labels"]) == len(preds["choices"]) == len(preds["teacher"]) > 0
    for y, own, t, s in zip(preds["labels"], preds["choices"], preds["teacher"], preds["student"]):
        assert y in own and t in own and s in own
    assert main(["run", *base, "data.eval_size=10", "data.train_size=10", "data.unlabeled_size=20", "distill=quick",
                 "pipeline.stages=[evaluate,distill]", "run.name=D"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "D" / "01_distill" / "pseudo_labels.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 20
    assert all(r["answer"] in [f" {c}" for c in choices[r["text"]]] for r in rows)  # each example's own choices


def test_jsonl_choices_field_evaluates(tmp_path):
    rows = [{"text": f"question {i}", "options": _own_choices(i), "label": i % 3} for i in range(40)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["run", *FAST, "data=jsonl", f"data.path={path}", "data.choices_field=options",
                 "pipeline=evaluate", f"run.root={tmp_path}", "run.name=J"]) == 0
    preds = json.loads((tmp_path / "J" / "00_evaluate" / "predictions.json").read_text())
    own = {r["text"]: r["options"] for r in rows}
    assert all(y in c and t in c for y, c, t in zip(preds["labels"], preds["choices"], preds["teacher"]))
    assert all(c in own.values() for c in preds["choices"])


def test_label_not_among_its_choices_exits_2(tmp_path, capsys):
    rows = [{"text": f"question {i}", "options": ["yes", "no", "unsure"], "label": "perhaps" if i == 5 else "no"}
            for i in range(40)]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    code = main(["run", *FAST, "data=jsonl", f"data.path={path}", "data.choices_field=options", "pipeline=evaluate",
                 f"run.root={tmp_path}", "run.name=X"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err
    assert "data.label_field='label'" in err and "'perhaps' not in ['yes', 'no', 'unsure']" in err
