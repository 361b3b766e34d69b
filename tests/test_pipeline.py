"""`compress run` end to end on tiny random models and real review data, as a user runs it."""
import json

import pytest

from conftest import TINY, cli

FIELDS = ("accuracy", "agreement", "perplexity", "prefill_ms", "decode_tok_s", "size_mb", "params", "peak_mem_mb")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = cli("run", *TINY, "pipeline=evaluate", f"run.root={root}", "run.name=N")
    assert proc.returncode == 0, proc.stderr
    return root / "N", proc


def test_run_writes_artifacts_and_results(first_run):
    run, proc = first_run
    stage = run / "00_evaluate"
    assert {p.name for p in stage.iterdir()} == {"config.yaml", "metrics.json", "manifest.json", "DONE",
                                                 "predictions.json"}
    manifest = json.loads((stage / "manifest.json").read_text())
    assert {"config_hash", "input", "identity", "versions"} <= set(manifest)
    assert manifest["versions"]["torch"].startswith("2.")
    records = json.loads((run / "results.json").read_text())["records"]
    assert [r["role"] for r in records] == ["teacher", "student"]
    for r in records:
        for field in FIELDS:
            assert isinstance(r[field], (int, float)) and r[field] >= 0, (r["role"], field)
    assert 0 <= records[1]["accuracy"] <= 1 and records[0]["decode_tok_s"] > 0
    assert "decode tok/s" in proc.stdout  # the table at the end
    assert not list(run.glob(".*tmp*")) and not (run / ".hydra").exists() and not (run.parent / "outputs").exists()


def test_rerun_skips_finished_stages(first_run):
    run, _ = first_run
    before = (run / "00_evaluate" / "manifest.json").read_text()
    proc = cli("run", *TINY, "pipeline=evaluate", f"run.root={run.parent}", "run.name=N")
    assert proc.returncode == 0, proc.stderr
    assert "up to date, skipped" in proc.stderr
    assert (run / "00_evaluate" / "manifest.json").read_text() == before


def test_changed_eval_setting_remeasures(first_run):
    run, _ = first_run
    before = json.loads((run / "00_evaluate" / "manifest.json").read_text())
    proc = cli("run", *TINY, "pipeline=evaluate", "eval.decode_tokens=4", "eval.accuracy=false",
               f"run.root={run.parent}", "run.name=N")
    assert proc.returncode == 0, proc.stderr
    assert "00_evaluate: evaluation settings changed, re-measuring" in proc.stderr
    after = json.loads((run / "00_evaluate" / "manifest.json").read_text())
    assert after["eval_hash"] != before["eval_hash"]
    records = json.loads((run / "results.json").read_text())["records"]
    assert records[0]["accuracy"] is None  # measured again, with accuracy now off
    proc = cli("run", *TINY, "pipeline=evaluate", f"run.root={run.parent}", "run.name=N")  # back: measured again
    assert "re-measuring" in proc.stderr and "accuracy" in json.loads((run / "results.json").read_text())["records"][0]


@pytest.mark.parametrize("overrides, needles", [
    (["teacher=gpt5"], ["teacher='gpt5'", "llama7b, smollm2-135m, tiny-random"]),
    (["eval.batchsize=2"], ["eval.batchsize", "unknown key", "batch_size"]),
    (["data.path=/no/such/file.csv"], ["data.path='/no/such/file.csv'", "no such file"]),
    (["data.label_field=stars"], ["data.label_field='stars'", "its fields are"]),
    (["data.verbalizers={fresh: ' good'}"], ["data.verbalizers", "labels with no verbalizer: ['rotten']"]),
    (["data.eval_size=-5", "data.train_size=-1"], ["data.eval_size=-5", "data.train_size=-1", "must be >= 1"]),
    (["run.name=../escape"], ["run.name='../escape'", "inside run.root"]),
    (["eval.decode_tokens=0", "teacher.dtype=fp8"], ["eval.decode_tokens=0", "teacher.dtype='fp8'"]),
])
def test_bad_input_exits_2_and_keeps_what_was_saved(first_run, overrides, needles):
    run, _ = first_run
    saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = cli("run", *TINY, f"run.root={run.parent}", "run.name=N", *overrides)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == saved


def test_eval_command_scores_a_stage_model_folder(first_run, tmp_path):
    run, _ = first_run
    teacher = json.loads((run / "results.json").read_text())["records"][0]
    out = tmp_path / "eval.json"
    proc = cli("eval", teacher["path"], *TINY, f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())["records"][0]
    # the same model on the same data and settings scores as it did in the run's evaluate stage
    assert (record["accuracy"], record["perplexity"]) == pytest.approx((teacher["accuracy"], teacher["perplexity"]))
    assert record["path"] == teacher["path"] and record["decode_tok_s"] > 0
    assert record["example_scores"] == teacher["example_scores"] and record["score_ci"] == teacher["score_ci"]


def test_eval_of_a_missing_model_exits_2():
    proc = cli("eval", "./no/such/model", *TINY)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
