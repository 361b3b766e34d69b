"""Inputs the teacher writes for the transfer set (`data.synthetic_unlabeled`, teachers/synthetic.py)."""
import json

import pytest
import torch

from compress.cli import main
from compress.evaluate import eos_ids
from conftest import TINY, cli
from teachers import synthetic

QUICK = TINY + ["distill=quick", "eval.latency=false", "eval.perplexity=false", "trainer.progress_bar=false"]

EVAL = "the acting is superb and the plot keeps you guessing until the final scene"


@pytest.mark.parametrize("text, verdict", [
    (None, "unfinished"),
    ("Great film.", "short"),
    ("a GREAT film, truly!", "duplicate"),  # the pool's "A great film truly." up to case and punctuation
    ("honestly the plot keeps you guessing until the final scene, wow", "near_eval"),  # 8 words of EVAL
    ("Short eval text", "near_eval"),  # the whole of a short eval input
    ("the plot keeps you guessing until the end", "kept"),  # 7 words of EVAL in a row: not near
    ("A quiet, patient film about grief.", "kept"),
])
def test_verdicts(text, verdict):
    seen = {synthetic.words("A great film truly.")}
    near = synthetic.ngrams(EVAL) | synthetic.ngrams("short eval text")
    assert synthetic.verdict(text, seen, near) == verdict


def test_separator_is_a_newline_unless_inputs_span_lines():
    assert synthetic.separator(["one line", "another"]) == "\n"
    assert synthetic.separator(["a passage\nQuestion: who?", "x"]) == "\n###\n"


def test_written_inputs_obey_the_rules_and_leave_the_callers_random_state(tiny_teacher):
    _, model, tok = tiny_teacher
    pool = [f"review number {i} of a film I watched" for i in range(20)]
    state = torch.random.get_rng_state()
    runs = [synthetic.write_inputs(model, tok, pool, [EVAL], 3, seed=7, eos=eos_ids(tok, model.generation_config),
                                   batch_size=4) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert runs[0] == runs[1]  # seeded
    texts, counts = runs[0]
    assert len(texts) <= 3 and counts.get("kept", 0) == len(texts)
    assert sum(counts.values()) <= synthetic.MAX_TRIES * 3 + 4  # stops once the tries are spent (one batch over)
    seen = {synthetic.words(t) for t in pool}
    assert all(synthetic.verdict(t, seen, synthetic.ngrams(EVAL)) == "kept" for t in texts)


def test_stage_adds_written_inputs_and_reuses_them(tmp_path):
    base = [*QUICK, "pipeline.stages=[evaluate,distill]", "data.synthetic_unlabeled=3", f"run.root={tmp_path}",
            "run.name=S"]
    proc = cli("run", *base)
    assert proc.returncode == 0, proc.stderr
    stage = tmp_path / "S" / "01_distill"
    written = [json.loads(x)["text"] for x in (stage / "written_inputs.jsonl").read_text().splitlines()]
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["written_inputs"] == len(written) <= 3
    labelled = [json.loads(x)["text"] for x in (stage / "pseudo_labels.jsonl").read_text().splitlines()]
    assert labelled[len(labelled) - len(written):] == written  # pseudo-labelled after the real inputs
    assert "written inputs: kept" in proc.stdout + proc.stderr
    proc = cli("run", *base, "distill.temperature=3.0")
    assert proc.returncode == 0, proc.stderr
    assert "written inputs: reused" in proc.stdout + proc.stderr


def test_negative_count_and_own_choices_exit_2(tmp_path, capsys):
    assert main(["run", *QUICK, "data.synthetic_unlabeled=-1", f"run.root={tmp_path}"]) == 2
    assert "data.synthetic_unlabeled" in capsys.readouterr().err
    rows = [{"text": f"question {i}", "options": ["yes", "no", "maybe"], "label": i % 3} for i in range(40)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["run", *QUICK, "data=jsonl", f"data.path={path}", "data.choices_field=options",
                 "data.eval_size=10", "data.train_size=10", "data.unlabeled_size=10", "data.synthetic_unlabeled=5",
                 "pipeline.stages=[evaluate,distill]", f"run.root={tmp_path}", "run.name=C"])
    err = capsys.readouterr().err
    assert code == 2 and "data.synthetic_unlabeled" in err and "own choices" in err
    assert not (tmp_path / "C").exists()  # nothing ran
