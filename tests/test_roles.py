"""Explicit roles: every artifact records its teacher and its student, each stage declares the roles it
consumes and produces, and a pipeline either runs right or exits 2 before any stage starts. The gate
follows roles: it checks the students a stage hands on."""
import json

import pytest

from compress.cli import main
from conftest import TINY, cli

FAST = TINY + ["eval.latency=false", "eval.perplexity=false", "trainer.progress_bar=false", "distill=quick",
               "prune=quick", "finetune=quick", "quantize=quick"]


@pytest.mark.parametrize("stages, lacks", [
    ("[prune]", ["stage prune (#0) needs a teacher", "stage prune (#0) needs a student"]),
    ("[distill]", ["stage distill (#0) needs a teacher"]),
    ("[export,distill]", ["stage export (#0) needs a teacher", "stage export (#0) needs a student",
                          "stage distill (#1) needs a teacher"]),
    ("[finetune_teacher,evaluate]", ["stage finetune_teacher (#0) needs a teacher"]),
])
def test_a_stage_without_its_roles_exits_2_before_anything_runs(tmp_path, capsys, stages, lacks):
    code = main(["run", *FAST, f"pipeline.stages={stages}", f"run.root={tmp_path}", "run.name=R"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err, err
    for needle in lacks + ["start the pipeline with evaluate", "pipeline.stages=[evaluate,"]:
        assert needle in err, (needle, err)
    assert not (tmp_path / "R").exists()  # nothing ran, nothing written


def test_unknown_stage_lists_the_stages(tmp_path, capsys):
    assert main(["run", *FAST, "pipeline.stages=[evaluate,distil]", f"run.root={tmp_path}", "run.name=R"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "distil" in err and "evaluate, finetune_teacher, distill, prune, quantize, export" in err


@pytest.fixture(scope="module")
def ft_prune(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = cli("run", *FAST, "pipeline.stages=[evaluate,finetune_teacher,prune]", f"run.root={root}", "run.name=P")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "P"


def test_prune_after_finetuning_prunes_the_student_not_the_teacher(ft_prune):
    records = json.loads((ft_prune / "results.json").read_text())["records"]
    student = next(r for r in records if r["stage"] == "evaluate" and r["role"] == "student")
    teacher = next(r for r in records if r["stage"] == "finetune_teacher")
    assert student["params"] != teacher["params"]  # the tiny student is a model of its own
    prune = json.loads((ft_prune / "02_prune" / "metrics.json").read_text())
    assert prune["params_before"] == student["params"] and prune["input_model"] == student["path"]
    roles = prune["roles"]
    assert roles["student"]["path"] == "model" and roles["teacher"]["path"] == "../01_finetune_teacher/model"
    assert roles["teacher"]["variant"] in ("lora", "qlora")


def test_gate_checks_the_recovered_student_by_default_and_with_stage_prune(ft_prune):
    for args in ([], ["--stage", "prune"]):
        proc = cli("check", str(ft_prune), "--min-retention", "0.01", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "(stage prune)" in proc.stdout and "(recovered)" in proc.stdout and "(pruned)" not in proc.stdout


def test_gate_on_a_stage_without_a_student_checks_its_teacher(ft_prune):
    proc = cli("check", str(ft_prune), "--min-retention", "0.01", "--stage", "finetune_teacher")
    assert proc.returncode == 0 and "(stage finetune_teacher)" in proc.stdout and "teacher:" in proc.stdout
