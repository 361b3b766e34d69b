"""The real SmolLM2-135M-Instruct through the CLI: the generation paths (plain text, SQuAD answers)."""
import json

import pytest

from conftest import cli


@pytest.mark.slow
def test_smollm2_distils_plain_text_through_its_own_generations(tmp_path):
    """The generation path (data=text: the teacher's greedy continuations are the pseudo-labels) on the real
    model and tokenizer, whose encodings carry token_type_ids that generate() rejects."""
    from conftest import SQUAD

    proc = cli("run", "data=text", f"data.path={SQUAD}", "data.eval_size=8", "data.unlabeled_size=8",
               "data.max_chars=300", "pipeline.stages=[evaluate,distill]", "distill=quick",
               "distill.pseudo_max_new_tokens=8", "eval=quick", "eval.latency=false", f"run.root={tmp_path}",
               "run.name=text")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "text" / "01_distill" / "pseudo_labels.jsonl").open()]
    assert len(rows) == 8 and sum(bool(r["answer"].strip()) for r in rows) >= 6  # real continuations
    records = json.loads((tmp_path / "text" / "results.json").read_text())["records"]
    assert records[-1]["perplexity"] > 0 and records[-1]["perplexity_ratio"] > 0


@pytest.mark.slow
def test_smollm2_answers_squad_questions_and_distils_its_answers(tmp_path):
    """The generative path on the real model: greedy answers scored by EM/F1, the teacher's answers as
    pseudo-labels for distillation."""
    from conftest import DATA

    proc = cli("run", "data=squad", f"data.path={DATA / 'squad' / 'squad_dev_v1.1.json'}", "data.eval_size=12",
               "data.train_size=0", "data.unlabeled_size=8", "data.max_chars=600", "distill.max_length=256",
               "pipeline.stages=[evaluate,distill]", "distill=quick",
               "distill.pseudo_max_new_tokens=12", "eval=quick", "eval.latency=false", "eval.max_new_tokens=12",
               f"run.root={tmp_path}", "run.name=qa")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "qa"
    teacher = json.loads((run / "results.json").read_text())["records"][0]
    answers = json.loads((run / "00_evaluate" / "predictions.json").read_text())["teacher"]
    assert sum(bool(a.strip()) for a in answers) >= 9 and 0 <= teacher["exact_match"] <= teacher["f1"] <= 1
    pseudo = [json.loads(line) for line in (run / "01_distill" / "pseudo_labels.jsonl").open()]
    assert len(pseudo) == 8 and sum(bool(p["answer"].strip()) for p in pseudo) >= 6
    print(f"\nSmolLM2 zero-shot on 12 SQuAD questions: EM {teacher['exact_match']:.3f}, F1 {teacher['f1']:.3f}")
