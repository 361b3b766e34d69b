"""The benchmark scripts on tiny random models (their real runs are the lead's; figures in benchmarks/results/)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "benchmarks"))
import bandwidth_ceiling  # noqa: E402
import baselines  # noqa: E402


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=600)


def test_bytes_per_token_counts_what_a_token_reads(tiny_teacher):
    folder, model, _ = tiny_teacher
    everything = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    embed = model.get_input_embeddings().weight
    tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    expected = everything if tied else everything - embed.numel() * embed.element_size()
    assert bandwidth_ceiling.bytes_per_token(Path(folder)) == expected


def test_read_bandwidth_is_measured():
    rows = bandwidth_ceiling.read_bandwidth([4], repeats=1)
    assert len(rows) == 2 and all(r["gb_s"] > 0 for r in rows)


def test_int8_dynamic_skips_lm_head(tiny_teacher):
    import copy

    _, model, _ = tiny_teacher
    q = baselines.int8_dynamic(copy.deepcopy(model))
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_pipeline_tradeoff_and_baselines_on_tiny_models(tmp_path):
    out = tmp_path / "tradeoff.json"
    proc = _script("pipeline_tradeoff.py", "--out", str(out), *TINY, "pipeline=evaluate", f"run.root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert [r["role"] for r in res["records"]] == ["teacher", "student"] and Path(res["report"]).is_file()
    run = Path(res["run"])
    export = run / "09_export" / "model"  # a corrupt exported model: a skipped row that says why
    export.mkdir(parents=True)
    (export / "model.onnx").write_bytes(b"")
    out = tmp_path / "baselines.json"
    proc = _script("baselines.py", "--run", str(run), "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"teacher fp32", "student fp32", "student bf16", "student int8 dynamic"} <= set(rows)
    t, st = rows["teacher fp32"], rows["student fp32"]
    assert t["speed_vs_student_fp32"] == pytest.approx(t["decode_tok_s"] / st["decode_tok_s"])
    assert "accuracy" in rows["student int8 dynamic"]
    student = json.loads((run / "00_evaluate" / "metrics.json").read_text())["roles"]["student"]["path"]
    assert json.loads(out.read_text())["student"] == str((run / "00_evaluate" / student).resolve())  # by role
    assert "onnxruntime cannot open" in rows["student onnx 09_export/model"]["skipped"]


def test_squad_calibration_and_soft_on_benchmarks_on_tiny_models(tmp_path):
    from conftest import DATA

    out = tmp_path / "squad.json"
    proc = _script("squad.py", "--out", str(out), "teacher=tiny-random", "student=tiny-random", "eval=quick",
                   "eval.max_new_tokens=3", "data.eval_size=6", f"data.path={DATA / 'squad' / 'squad_dev_v1.1.json'}", "pipeline=evaluate",
                   f"run.root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(r["role"], r["metric"]) for r in res["records"]] == [("teacher", "f1"), ("student", "f1")]
    assert "teacher, zero-shot" in proc.stdout and len(res["hardware"]["load_average"]) == 3

    out = tmp_path / "calibration.json"
    proc = _script("calibration.py", "--models", "tiny-random", "--rounds", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["default", "calibrated"] and rows[1]["decode_speedup"] > 0
    assert rows[1]["timings"] and rows[0]["attn_implementation"] == "sdpa"

    out = tmp_path / "soft_on.json"
    proc = _script("soft_on.py", "--out", str(out), *TINY, "distill=quick", f"run.root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"answer", "all"} and all(r["perplexity_ratio"] > 0 for r in rows.values())


def test_kd_vs_sft_writes_scores_per_task_variant_and_seed_and_keeps_finished_runs(tmp_path):
    out = tmp_path / "kd_vs_sft.json"
    args = ["teacher=tiny-random", "student=tiny-random", "finetune=quick", "distill=quick", "eval=quick",
            "eval.max_new_tokens=3", "data.eval_size=6", "data.train_size=16", "data.unlabeled_size=16",
            "--out", str(out), "--root", str(tmp_path), "--seeds", "1", "2", "--variants", "sft", "kd_on_policy"]
    proc = _script("kd_vs_sft.py", *args, "--tasks", "rotten_tomatoes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rt = res["tasks"]["rotten_tomatoes"]
    assert set(rt) == {"sft", "kd_on_policy"} and all(len(v["scores"]) == 2 and v["seeds"] == [1, 2] for v in rt.values())
    assert all(v["stderr"] >= 0 and v["runs"][0]["metric"] == "accuracy" for v in rt.values())
    assert "in SE" in proc.stdout
    proc = _script("kd_vs_sft.py", *args, "--tasks", "squad", "--seeds", "1", "--variants", "sft", "kd_synthetic")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"rotten_tomatoes", "squad"}  # the first task's runs kept, not rerun
    assert res["tasks"]["squad"]["sft"]["runs"][0]["metric"] == "f1"
    assert "written inputs: kept" in proc.stdout + proc.stderr  # passages and questions: the `###` separator


def test_depth_speed_fits_time_per_token_against_depth(tmp_path):
    import depth_speed

    a, b = depth_speed.fit([1, 2, 4], [0.003, 0.004, 0.006])  # 2 ms fixed + 1 ms per layer
    assert (a, b) == (pytest.approx(0.002), pytest.approx(0.001))
    out = tmp_path / "depth.json"
    proc = _script("depth_speed.py", *TINY, "--depths", "1", "--rounds", "1", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())["forms"]["int8"]
    assert res["depths"]["1"]["speedup"] == pytest.approx(res["depths"]["1"]["tok_s"] / res["teacher_tok_s"])


def test_int4_forms_scores_and_times_each_low_bit_form_of_an_export(tmp_path):
    from conftest import cli

    proc = cli("run", *TINY, "pipeline=export", f"run.root={tmp_path}", "run.name=F")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "forms.json"
    proc = _script("int4_forms.py", str(tmp_path / "F" / "01_export"), *TINY, "--mixed", "1", "--rounds", "1",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert set(res["forms"]) == {"fp32", "int4", "int4-asym", "int4-hqq", "int8-nbits", "mixed-1"}
    assert res["forms"]["fp32"]["minus_fp32"][0] == 0 and len(res["teacher_int8_tok_s"]) == 1
    assert res["ranked"][0] in res["sensitivity"] and all(v >= -1e-6 for v in res["sensitivity"].values())


def test_eval_cost_times_full_and_gathered_scoring_and_the_teachers_pass(tmp_path):
    from conftest import cli

    quick = [*TINY, "finetune=quick", "distill=quick"]
    proc = cli("run", *quick, f"run.root={tmp_path}", "run.name=C")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "cost.json"
    proc = _script("eval_cost.py", str(tmp_path / "C"), *quick, "--examples", "16", "--reviews", "16", "--rounds", "1",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert {"onnx", "onnx-int8", "onnx-int4", "teacher-onnx", "teacher-onnx-int8"} == set(res["scoring"])
    assert all(r["accuracy"]["full"] == r["accuracy"]["gathered"] and r["speedup"] > 0 for r in res["scoring"].values())
    assert set(res["pseudo_label_pass"]) == {"autocast, batch 8", "autocast, batch 32", "bf16 weights, batch 32"}
    assert all(0 <= r["labels_equal_fp32"] <= 16 for r in res["pseudo_label_pass"].values())
    assert len(res["load_average_start"]) == 3
