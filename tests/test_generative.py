"""Generative tasks with references: SQuAD-format data (any such file) and jsonl with data.target_field; greedy
answers scored by exact match and F1 with SQuAD's normalisation; splits by paragraph; fine-tuning and
distillation on the answer tokens, with the teacher's generated answers as pseudo-labels."""
import json

import pytest
import torch

from compress.config import load_config
from conftest import DATA, cli

SQUAD_DEV = DATA / "squad" / "squad_dev_v1.1.json"
TINY = ["teacher=tiny-random", "student=tiny-random", "data=squad", "eval=quick", "eval.max_new_tokens=4",
        "data.max_chars=300", "trainer.progress_bar=false"]


@pytest.mark.parametrize("prediction, references, em, f1", [
    ("the Denver Broncos", ["Denver Broncos"], 1.0, 1.0),  # articles and case do not count
    ("Broncos!", ["Denver Broncos", "The Broncos"], 1.0, 1.0),  # the best reference counts
    ("Denver", ["Denver Broncos"], 0.0, 2 * (1 * 0.5) / 1.5),  # precision 1, recall 1/2
    ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0),
])
def test_squad_metrics(prediction, references, em, f1):
    from compress.evaluate import exact_match, token_f1

    assert exact_match(prediction, references) == em and token_f1(prediction, references) == pytest.approx(f1)


@pytest.fixture(scope="module")
def small_squad(tmp_path_factory):
    """The first 3 articles of the real SQuAD dev set: a SQuAD-format file of our own."""
    data = json.loads(SQUAD_DEV.read_text())
    path = tmp_path_factory.mktemp("squad") / "small.json"
    path.write_text(json.dumps({"version": "1.1", "data": data["data"][:3]}))
    return path


def test_splits_never_share_a_paragraph(small_squad):
    from compress.data import load_splits

    cfg = load_config([f"data.path={small_squad}", "data=squad", "data.eval_size=40", "data.train_size=60",
                       "data.unlabeled_size=60"]).data
    s = load_splits(cfg)
    assert s.generative and (len(s.eval), len(s.train), len(s.unlabeled)) == (40, 60, 60)
    groups = [{e.group for e in split} for split in (s.eval, s.train, s.unlabeled)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert all(e.answers for e in s.eval + s.train) and all(e.answers is None for e in s.unlabeled)
    assert s.answer(s.train[0]) == s.train[0].answers[0] + "\n" and "Question: " in s.eval[0].text


@pytest.mark.parametrize("kind", ["kv-cache", "logits"])
def test_greedy_generation_matches_a_reference_loop(tiny_teacher, kind):
    """The batched generators (transformers' generate with the KV cache, left-padded; and the bare-logits
    loop, right-padded) equal a one-prompt-at-a-time greedy loop in float64."""
    from compress.evaluate import generate_greedy, logits_generate_fn, torch_generate_fn, torch_logits_fn

    _, model, tok = tiny_teacher
    prompts = ["Question: who?", "A much longer prompt about the Broncos and the Panthers, question: when?"]
    gen = (torch_generate_fn(model, tok.pad_token_id, [tok.eos_token_id]) if kind == "kv-cache" else
           logits_generate_fn(torch_logits_fn(model), tok.pad_token_id, [tok.eos_token_id]))
    got = generate_greedy(gen, tok, prompts, chat=False, max_new_tokens=5, batch_size=2)
    m64 = model.to(torch.float64)
    try:
        for prompt, answer in zip(prompts, got):
            ids = tok(prompt)["input_ids"]
            new = []
            for _ in range(5):
                with torch.no_grad():
                    nxt = int(m64(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                if "\n" in tok.decode(new):
                    break
            assert answer == tok.decode(new, skip_special_tokens=True).split("\n")[0].strip()
    finally:
        model.to(torch.float32)


def test_squad_pipeline_fine_tunes_and_distils_on_answers(tmp_path, small_squad):
    proc = cli("run", *TINY, f"data.path={small_squad}", "data.eval_size=16", "data.train_size=16",
               "data.unlabeled_size=16", "finetune=quick", "distill=quick", "distill.pseudo_max_new_tokens=4",
               # the default preset's cache settings: on a generative task the teacher runs in every step
               "distill.topk_cache=32", "distill.hidden_weight=1", "distill.soft_on=answer",
               "pipeline.stages=[evaluate,finetune_teacher,distill]", f"run.root={tmp_path}", "run.name=G")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "here it runs in every step" in proc.stdout + proc.stderr
    run = tmp_path / "G"
    records = json.loads((run / "results.json").read_text())["records"]
    for r in records:
        assert r["metric"] == "f1" and 0 <= r["f1"] <= 1 and 0 <= r["exact_match"] <= r["f1"] + 1e-9
        assert r["accuracy"] is None and 0 <= r["agreement"] <= 1
        # the primary metric's per-example scores (F1, to 4 decimals) and its interval
        assert len(r["example_scores"]) == 16 and sum(r["example_scores"]) / 16 == pytest.approx(r["f1"], abs=1e-4)
        assert r["score_ci"][0] <= r["f1"] + 1e-4 and r["f1"] - 1e-4 <= r["score_ci"][1]
    student = records[-1]
    if records[2]["f1"]:  # retention over the task's metric, F1, against the fine-tuned teacher
        assert student["retention"] == pytest.approx(student["f1"] / records[2]["f1"])
    else:  # a tiny random teacher may answer nothing right: no ratio, never a division by zero
        assert student["retention"] is None
    pseudo = [json.loads(line) for line in (run / "02_distill" / "pseudo_labels.jsonl").open()]
    assert len(pseudo) == 16 and all(p["answer"].endswith("\n") for p in pseudo)  # the teacher's own answers
    preds = json.loads((run / "00_evaluate" / "predictions.json").read_text())
    assert len(preds["teacher"]) == 16 and all(isinstance(p, str) for p in preds["teacher"])


def test_jsonl_with_target_field(tmp_path):
    rows = [{"q": f"What is {i} plus one?", "a": [str(i + 1), f"{i + 1}."], "doc": i // 3} for i in range(60)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    proc = cli("run", "teacher=tiny-random", "student=tiny-random", "data=jsonl", f"data.path={path}",
               "data.text_field=q", "data.target_field=a", "data.group_field=doc", "data.metric=exact_match",
               "data.eval_size=12", "eval=quick", "eval.max_new_tokens=3", "pipeline=evaluate",
               f"run.root={tmp_path}", "run.name=J")
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = json.loads((tmp_path / "J" / "results.json").read_text())["records"][0]
    assert teacher["metric"] == "exact_match" and teacher["exact_match"] is not None
    assert sum(teacher["example_scores"]) / 12 == pytest.approx(teacher["exact_match"])


def test_a_label_metric_on_a_generative_task_exits_2(tmp_path, small_squad):
    proc = cli("run", *TINY, f"data.path={small_squad}", "data.metric=accuracy", "pipeline=evaluate",
               f"run.root={tmp_path}", "run.name=M")
    assert proc.returncode == 2 and "data.metric='accuracy'" in proc.stderr and "f1 or exact_match" in proc.stderr


def test_a_misspelled_target_or_group_field_exits_2(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": str(i)}) for i in range(20)))
    proc = cli("run", "teacher=tiny-random", "student=tiny-random", "data=jsonl", f"data.path={path}",
               "data.text_field=q", "data.target_field=a", "data.group_field=docid", "data.metric=f1",
               "data.eval_size=5", "eval=quick", "pipeline=evaluate", f"run.root={tmp_path}", "run.name=B")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.group_field='docid'" in proc.stderr and "its fields are: q, a" in proc.stderr


def test_eos_ids_include_the_generation_configs_end_of_turn(tiny_teacher):
    from transformers import GenerationConfig

    from compress.evaluate import eos_ids

    _, _, tok = tiny_teacher
    assert eos_ids(tok) == [tok.eos_token_id]
    assert eos_ids(tok, GenerationConfig(eos_token_id=[tok.eos_token_id, 107])) == [tok.eos_token_id, 107]
    assert eos_ids(tok, GenerationConfig(eos_token_id=5)) == [tok.eos_token_id, 5]


def test_a_question_whose_answer_the_cut_removed_is_dropped():
    from compress.data import _answers_in

    context = "Warsaw lies on the  Vistula"[:30]
    assert _answers_in(" ".join(context.split()), ["the  Vistula", "Krakow", " ", "Warsaw"]) == ("the Vistula", "Warsaw")
