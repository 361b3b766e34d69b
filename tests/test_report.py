"""results.json/csv, report.md/png, `compress check` (exit codes 0/1/2), `compress report`,
`compress bench` and `assert_retention`, on a real tiny run and on results files derived from it."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compress import stats
from compress.errors import CompressError
from compress.report import pareto
from compress.records import Record, relate
from compress.testing import assert_retention
from conftest import TINY, cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = cli("run", *TINY, "pipeline=evaluate", f"run.root={root}", "run.name=A")
    assert proc.returncode == 0, proc.stderr
    return root / "A"


def _derived(run, tmp_path, name: str, student=None, teacher=None):
    """A copy of the run's results whose student (and teacher) scored `student(scores)` (`teacher(scores)`) per
    example instead, as a worse or better model would; accuracy and the derived figures recomputed."""
    res = json.loads((run / "results.json").read_text())
    records = [Record.from_dict(r) for r in res["records"]]
    for r, change in zip(records, (teacher, student)):
        if change is not None:
            r.example_scores = change(list(r.example_scores))
            r.accuracy = sum(r.example_scores) / len(r.example_scores)
    relate(records)
    res["records"] = [r.to_dict() for r in records]
    out = tmp_path / name
    out.mkdir()
    (out / "results.json").write_text(json.dumps(res))
    return out, res["records"][1]


def test_run_writes_results_csv_and_report(run):
    res = json.loads((run / "results.json").read_text())
    teacher, student = res["records"]
    assert student["retention"] == pytest.approx(student["accuracy"] / teacher["accuracy"])
    assert student["speedup"] == pytest.approx(student["decode_tok_s"] / teacher["decode_tok_s"])
    assert student["stage_wall_s"] > 0 and res["header"]["base_teacher"]["stage"] == "evaluate"
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [r["role"] for r in rows] == ["teacher", "student"]
    assert {"retention", "retention_base", "speedup", "prefill_ms", "decode_tok_s", "stage_wall_s"} <= set(rows[0])
    md = (run / "report.md").read_text()
    assert "| evaluate | student:tiny-random | - | torch |" in md and "`00_evaluate`" in md and "```yaml" in md
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_command_rebuilds(run):
    (run / "report.png").unlink()
    (run / "report.md").unlink()
    proc = cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    assert (run / "report.png").is_file() and (run / "report.md").is_file()


def test_check_passes_and_fails_at_the_measured_retention(run):
    retention = json.loads((run / "results.json").read_text())["records"][1]["retention"]
    ok = cli("check", str(run), "--min-retention", f"{retention - 0.001:.4f}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "evaluate student:tiny-random [torch]" in ok.stdout
    bad = cli("check", str(run), "--min-retention", f"{retention + 0.001:.4f}", "--stage", "evaluate")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL" in bad.stdout


def test_check_baseline_paired_drop(run, tmp_path):
    """The gate's paired test: identical runs pass; half of the examples lost is a significant drop, which fails
    above --max-drop and passes within it; a better run passes."""
    base, _ = _derived(run, tmp_path, "base", student=lambda s: [1] * len(s))
    worse, _ = _derived(run, tmp_path, "worse", student=lambda s: [0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2))
    low = ["--min-retention", "0.01"]  # retention passes: only the drop decides
    same = cli("check", str(base), *low, "--baseline", str(base), "--max-drop", "0")
    assert same.returncode == 0 and "no significant drop (+0.000, CI 0.000..0.000)" in same.stdout, same.stdout
    bad = cli("check", str(worse), *low, "--baseline", str(base))
    assert bad.returncode == 1 and "significant drop of 0.500 (CI 0." in bad.stdout, bad.stdout + bad.stderr
    within = cli("check", str(worse), *low, "--baseline", str(base), "--max-drop", "0.6")
    assert within.returncode == 0 and "significant drop of 0.500" in within.stdout, within.stdout + within.stderr
    assert cli("check", str(base), *low, "--baseline", str(worse)).returncode == 0


def test_gate_ignores_one_example_of_500(run, tmp_path):
    """One example of 500 lost is noise, not a drop: no failure even with --max-drop 0.001; the two runs must
    have scored the same number of examples."""
    from compress import gate

    rng = np.random.default_rng(1)
    scores = {"teacher": rng.integers(0, 2, 500).tolist(), "student": rng.integers(0, 2, 500).tolist()}
    base, _ = _derived(run, tmp_path, "base", teacher=lambda _: scores["teacher"], student=lambda _: scores["student"])
    one = scores["student"].index(1)
    new, _ = _derived(run, tmp_path, "new", teacher=lambda _: scores["teacher"],
                      student=lambda _: scores["student"][:one] + [0] + scores["student"][one + 1:])
    _, rows = gate.checks(new, 0.01, baseline=base, max_drop=0.001)
    assert rows[-1].passed and "no significant drop (+0.002, CI 0.000.." in rows[-1].value, rows[-1]
    with pytest.raises(CompressError, match="evaluated 500 examples .* evaluated 40"):
        gate.checks(run, 0.01, baseline=base)


@pytest.mark.parametrize("args, needle", [
    (["/no/such/run"], "no such run folder"),
    (["EMPTY"], "has no results.json"),
    (["RUN", "--stage", "prune"], "no such stage in this run; its stages are ['evaluate']"),
    (["RUN", "--baseline", "OTHER"], "has no accuracy for evaluate student"),
    (["RUN", "--min-retention", "-1"], "--min-retention=-1.0"),
    (["RUN", "--confidence", "1"], "--confidence=1.0: must be in (0, 1)"),
    (["RUN", "--confidence", "0"], "--confidence=0.0: must be in (0, 1)"),
])
def test_check_bad_input_exits_2(run, tmp_path, args, needle):
    (tmp_path / "EMPTY").mkdir()
    other = tmp_path / "OTHER"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"header": {}, "records": []}))
    args = [str(run) if a == "RUN" else str(tmp_path / a) if a in ("EMPTY", "OTHER") else a for a in args]
    proc = cli("check", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_assert_retention(run, tmp_path):
    retention = json.loads((run / "results.json").read_text())["records"][1]["retention"]
    assert_retention(run, min_retention=retention - 0.001)
    with pytest.raises(AssertionError, match="FAIL") as info:
        assert_retention(run, min_retention=retention + 0.001, stage="evaluate")
    assert "retention >= " in str(info.value)
    with pytest.raises(CompressError):
        assert_retention(tmp_path / "missing")


def test_relate_uses_fine_tuned_teacher_and_base_speed():
    records = [Record("evaluate", "teacher", "t", accuracy=0.5, decode_tok_s=10.0),
               Record("finetune_teacher", "teacher", "t", variant="qlora", accuracy=0.8, decode_tok_s=12.0),
               Record("distill", "student", "s", accuracy=0.72, decode_tok_s=30.0)]
    refs = relate(records)
    assert records[2].retention == pytest.approx(0.9) and records[2].retention_base == pytest.approx(1.44)
    assert records[2].speedup == pytest.approx(3.0) and records[1].speedup == pytest.approx(1.2)
    assert refs["reference"]["stage"] == "finetune_teacher" and refs["base_teacher"]["stage"] == "evaluate"


def test_record_round_trips_and_reads_old_roles():
    r = Record.of("export", "student", "smollm2-slim", {"accuracy": 0.7, "predictions": ["a"], "parity_top1": 1.0},
                  variant="onnx-int8", backend="onnxruntime")
    assert "predictions" not in r.to_dict() and r.extra == {"parity_top1": 1.0}
    assert Record.from_dict(r.to_dict()) == r
    old = Record.from_dict({"stage": "prune", "role": "student-recovered", "model": "s", "accuracy": 0.5})
    assert (old.role, old.variant) == ("student", "recovered")


def test_pareto_front():
    assert pareto([(1, 0.9), (2, 0.8), (3, 0.5), (1.5, 0.7), (2, 0.6)]) == [(3, 0.5), (2, 0.8), (1, 0.9)]


def test_bench_torch_folder(run, tmp_path):
    teacher = json.loads((run / "results.json").read_text())["records"][0]["path"]
    out = tmp_path / "bench.json"
    proc = cli("bench", teacher, "--prompt-lengths", "8,16", "--decode-tokens", "4", "--runs", "1", "--warmup", "0",
               "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == "torch" and [r["prompt_tokens"] for r in result["rows"]] == [8, 16]
    assert all(r["prefill_ms"] > 0 and r["decode_tok_s"] > 0 for r in result["rows"]) and result["threads"] == 1
    assert "decode tok/s" in proc.stdout


@pytest.mark.slow
def test_bench_gguf_on_llamacpp(tmp_path):
    """The optional llama.cpp backend (the `llamacpp` extra) on the real model's bundled GGUF; its absence is the
    `gguf` case of the next test."""
    pytest.importorskip("llama_cpp")
    from compress.config import load_config
    from teachers import loading

    gguf = loading.bundled_gguf(load_config([]).teacher, "teacher")
    out = tmp_path / "bench.json"
    proc = cli("bench", str(gguf), "--prompt-lengths", "8", "--decode-tokens", "4", "--runs", "1", "--warmup", "0",
               "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == "llama.cpp" and result["rows"][0]["decode_tok_s"] > 0


@pytest.mark.parametrize("setup, args, needle", [
    ("missing", [], "no such file or folder"),
    ("onnx", [], "onnxruntime cannot open model.onnx"),
    ("gguf", [], "pip install llama-cpp-python=="),
    ("teacher", ["--prompt-lengths", "8,x"], "--prompt-lengths='8,x'"),
    ("teacher", ["--prompt-lengths", "100000"], "exceeds the model's"),
])
def test_bench_bad_input_exits_2(run, tmp_path, setup, args, needle):
    path = tmp_path / "missing"
    if setup == "onnx":
        path = tmp_path / "export"
        path.mkdir()
        (path / "model.onnx").write_bytes(b"")
    if setup == "gguf":
        if __import__("importlib").util.find_spec("llama_cpp") is not None:
            pytest.skip("llama-cpp-python is installed here")
        path = tmp_path / "model.gguf"
        path.write_bytes(b"GGUF")
    if setup == "teacher":
        path = json.loads((run / "results.json").read_text())["records"][0]["path"]
    proc = cli("bench", str(path), "--runs", "1", "--decode-tokens", "2", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_report_without_accuracy(run, tmp_path):
    from compress.report import write_report

    res = json.loads((run / "results.json").read_text())
    for r in res["records"]:
        r.pop("accuracy"), r.pop("retention", None)
    dest = tmp_path / "noacc"
    shutil.copytree(run, dest)
    (dest / "results.json").write_text(json.dumps(res))
    md, png = write_report(dest)
    assert png.is_file() and "| - |" in md.read_text()


def test_record_path_resolves_a_relative_run_root(tmp_path):
    from compress.results import record_path

    run = tmp_path / "elsewhere" / "runs" / "R"
    assert record_path(run, "runs/R/02_distill/model") == run / "02_distill" / "model"
    assert record_path(run, "/abs/model") == Path("/abs/model")


def test_perplexity_ratio_is_derived_and_gated(run):
    teacher, student = json.loads((run / "results.json").read_text())["records"]
    assert student["perplexity_ratio"] == pytest.approx(student["perplexity"] / teacher["perplexity"])
    assert "ppl / teacher" in (run / "report.md").read_text()
    ratio = student["perplexity_ratio"]
    ok = cli("check", str(run), "--min-retention", "0.01", "--max-perplexity-ratio", f"{ratio * 1.01:.6g}")
    assert ok.returncode == 0 and "perplexity / teacher <=" in ok.stdout, ok.stdout + ok.stderr
    bad = cli("check", str(run), "--min-retention", "0.01", "--max-perplexity-ratio", f"{ratio * 0.99:.6g}")
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    assert cli("check", str(run), "--max-perplexity-ratio", "0").returncode == 2


def test_bootstrap_interval_matches_a_direct_loop():
    """The vectorised interval equals a float64 loop over the same seeded resamples."""
    assert stats.mean_ci([1] * 30) == [1.0, 1.0] and stats.mean_ci([]) is None
    scores = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0.5, 0.25]
    rng, v = np.random.default_rng(stats.SEED), np.asarray(scores, dtype=np.float64)
    means = [v[rng.integers(0, len(v), size=len(v))].mean() for _ in range(stats.RESAMPLES)]
    assert stats.mean_ci(scores) == pytest.approx(np.quantile(means, [0.025, 0.975]).tolist(), abs=1e-12)
    low, high = stats.mean_ci(scores, confidence=0.5)
    assert stats.mean_ci(scores)[0] <= low < np.mean(scores) < high <= stats.mean_ci(scores)[1]


def test_paired_retention_interval():
    """retention_ci divides the student's mean by the teacher's on the same resampled examples; relate sets it
    (the reference teacher's is [1, 1]), and a record without per-example scores gets no interval."""
    teacher = [1, 1, 0, 1, 1, 1, 0, 1, 1, 0]
    student = [1, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    rng = np.random.default_rng(stats.SEED)
    t, s = np.asarray(teacher, dtype=np.float64), np.asarray(student, dtype=np.float64)
    ratios = []
    for _ in range(stats.RESAMPLES):
        idx = rng.integers(0, len(t), size=len(t))
        ratios.append(s[idx].mean() / t[idx].mean())
    expected = np.quantile(ratios, [0.025, 0.975]).tolist()
    records = [Record("evaluate", "teacher", "t", accuracy=0.7, example_scores=teacher),
               Record("distill", "student", "s", accuracy=0.6, example_scores=student),
               Record("prune", "student", "s", accuracy=0.5)]  # an old record: no per-example scores
    relate(records)
    assert records[1].retention_ci == pytest.approx(expected, abs=1e-12) and records[0].retention_ci == [1.0, 1.0]
    assert records[1].score_ci == stats.mean_ci(student)
    assert records[2].score_ci is None and records[2].retention_ci is None
    assert stats.ratio_ci(student, teacher[:5]) is None


def test_tables_show_intervals_and_old_records_none(run):
    res = json.loads((run / "results.json").read_text())
    student = res["records"][1]
    low, high = student["score_ci"]
    assert len(student["example_scores"]) == 40 and low <= student["accuracy"] <= high
    assert f"{student['accuracy']:.3f} [{low:.3f}, {high:.3f}]" in (run / "report.md").read_text()
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert float(rows[1]["retention_ci_low"]) == pytest.approx(student["retention_ci"][0])
    from compress.results import cells

    old = Record.from_dict({"stage": "distill", "role": "student", "model": "s", "accuracy": 0.5}).to_dict()
    assert "0.500" in cells(old) and not any("[" in c for c in cells(old))


def _points() -> list[dict]:
    """Fourteen records whose points crowd each other: twelve students a hair apart, a teacher, a baseline."""
    recs = [{"stage": f"stage{i}", "role": "student", "model": "student-model", "variant": f"form-{i}",
             "backend": ("torch", "onnxruntime", "gptq")[i % 3], "retention": 0.9 + 0.012 * (i % 4),
             "retention_ci": [0.85 + 0.012 * (i % 4), 0.95 + 0.012 * (i % 4)],
             "decode_tok_s": 10 * 1.05 ** i, "size_mb": 100 / 1.05 ** i} for i in range(12)]
    recs.append({"stage": "evaluate", "role": "teacher", "model": "teacher-model", "variant": "base",
                 "backend": "torch", "retention": 1.0, "retention_ci": [1.0, 1.0], "decode_tok_s": 9.0,
                 "size_mb": 120.0})
    recs.append({"stage": "export", "role": "teacher", "model": "teacher-model", "variant": "onnx-int8",
                 "backend": "onnxruntime", "retention": 0.99, "retention_ci": [0.95, 1.02], "decode_tok_s": 12.0,
                 "size_mb": 40.0})
    return recs


def test_plot_labels_apart_inside_with_error_bars_and_baseline():
    from matplotlib.container import ErrorbarContainer

    from compress.report import figure

    fig = figure(_points(), "crowded")
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(boxes) == 14
        for i, a in enumerate(boxes):
            assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1, ax.texts[i]
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), ax.texts[i]
        assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 14
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "baseline (teacher on onnxruntime)" in legend and "95% interval" in legend
