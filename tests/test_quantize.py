"""Stage `quantize`: GPTQ (GPTQModel) on tiny random Llamas through the CLI, the saved checkpoint loading
with `AutoModelForCausalLM.from_pretrained`, and every bad input ending with exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, RT_CSV, TINY, cli

QUICK = [*TINY, "prune=quick", "distill=quick", "quantize=quick", "pipeline.stages=[evaluate,distill,prune,quantize,export]"]


def test_group_size_must_divide_every_input_width():
    from compress.errors import CompressError
    from compress.stages.quantize import check_group_size

    smollm2 = {"hidden_size": 576, "num_attention_heads": 9, "intermediate_size": 1536}
    check_group_size(64, smollm2)
    check_group_size(-1, smollm2)
    with pytest.raises(CompressError) as e:
        check_group_size(128, smollm2)
    assert "quantize.group_size=128" in str(e.value) and "576" in str(e.value) and "group_size=64" in str(e.value)
    pruned_heads = {"hidden_size": 576, "num_attention_heads": 6, "head_dim": 64, "intermediate_size": 768}
    check_group_size(128, {**pruned_heads, "hidden_size": 512})  # o_proj reads heads x head_dim = 384
    with pytest.raises(CompressError, match="o_proj"):
        check_group_size(256, {**pruned_heads, "hidden_size": 512})


def test_link_model_twice_resumes(tmp_path):
    from compress.stages.quantize import link_model

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    link_model(tmp_path / "src", tmp_path / "dest")
    link_model(tmp_path / "src", tmp_path / "dest")  # a resumed stage: the folder from the first attempt is there
    assert (tmp_path / "dest" / "config.json").read_text() == "{}"


def test_missing_gptqmodel_names_the_install_command(monkeypatch):
    import importlib.util
    import tomllib

    from compress.errors import CompressError
    from compress.stages import quantize

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    with pytest.raises(CompressError) as e:
        quantize.require_gptqmodel()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gptq"]
    assert "pip install --no-build-isolation " + " ".join(pins) in str(e.value)  # the pins of pyproject.toml


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("user")  # run.root relative to the working directory, as by default
    proc = cli("run", *QUICK, "run.root=runs", "run.name=Q", cwd=home)
    assert proc.returncode == 0, proc.stderr
    return home / "runs" / "Q", proc


def test_distill_prune_quantize_export_hand_the_student_on(gptq_run):
    run, proc = gptq_run
    records = json.loads((run / "results.json").read_text())["records"]
    assert [(r["stage"], r["role"], r["variant"], r["output"]) for r in records][:6] == [
        ("evaluate", "teacher", "base", True), ("evaluate", "student", "", True), ("distill", "student", "", True),
        ("prune", "student", "pruned", False), ("prune", "student", "recovered", True),
        ("quantize", "student", "gptq", True)]
    assert [r["stage"] for r in records[6:]] == ["export"] * len(records[6:]) and len(records) > 6
    roles = {d.name: json.loads((d / "metrics.json").read_text())["roles"] for d in sorted(run.glob("0*"))}
    assert roles["02_prune"]["student"]["path"] == "model" and roles["04_export"]["student"]["path"] == \
        "../03_quantize/model"  # export hands on the (unquantized) student it exported
    params = json.loads((run / "02_prune" / "metrics.json").read_text())["params_before"]
    assert params == records[2]["params"]  # prune compressed the distilled student
    gptq = records[5]
    assert gptq["backend"] == "gptq" and gptq["stage"] == "quantize" and "size win" in gptq["note"]
    for key in ("accuracy", "agreement", "perplexity", "decode_tok_s", "size_mb", "peak_mem_mb", "quantize_s"):
        assert gptq[key] >= 0, key
    assert gptq["size_mb"] < records[4]["size_mb"] and gptq["params"] == records[4]["params"]
    stage = run / "03_quantize"
    assert {p.name for p in stage.iterdir()} == {"model", "gptq", "logs", "config.yaml", "metrics.json",
                                                 "manifest.json", "DONE"}
    assert (stage / "model" / "model.safetensors").read_bytes() == \
        (run / "02_prune" / "model" / "model.safetensors").read_bytes()  # the fp model, passed on for export
    quant = json.loads((stage / "gptq" / "config.json").read_text())["quantization_config"]
    assert quant["bits"] == 4 and quant["group_size"] == 32
    assert (stage / "logs" / "gptq.log").stat().st_size > 0
    assert not list(run.parent.parent.glob("gptq_log_*"))  # GPTQModel's own log files go to logs/ too
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).exists() for r in records if r.get("path"))
    assert "gptqmodel" not in proc.stdout.lower()  # its chatter stays in the log


def test_gptq_checkpoint_loads_with_transformers(gptq_run):
    """In its own process: GPTQModel, once imported, slows other models of the process."""
    run, _ = gptq_run
    code = f"""
import torch
from transformers import AutoModelForCausalLM
q = AutoModelForCausalLM.from_pretrained("{run / '03_quantize' / 'gptq'}", device_map="cpu", dtype=torch.float32)
fp = AutoModelForCausalLM.from_pretrained("{run / '03_quantize' / 'model'}")
assert type(q.model.layers[0].mlp.down_proj).__name__ != "Linear"
ids = torch.tensor([list(range(40, 72))])
with torch.no_grad():
    a, b = q(input_ids=ids).logits, fp(input_ids=ids).logits
agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
print("AGREE", agree)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    agree = float(proc.stdout.split("AGREE")[-1])
    assert agree >= 0.5  # 4-bit of a random model: the top-1 token mostly survives


def test_rerun_skips_and_group_size_that_does_not_divide_exits_2(gptq_run):
    run, _ = gptq_run
    proc = cli("run", *QUICK, f"run.root={run.parent}", "run.name=Q")
    assert proc.returncode == 0 and proc.stderr.count("up to date, skipped") == 5, proc.stderr
    saved = {p: p.read_bytes() for p in run.glob("0*/**/*") if p.is_file()}
    proc = cli("run", *QUICK, "quantize.group_size=48", f"run.root={run.parent}", "run.name=Q")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "quantize.group_size=48" in proc.stderr and "must divide" in proc.stderr
    assert {p: p.read_bytes() for p in run.glob("0*/**/*") if p.is_file()} == saved


@pytest.mark.parametrize("overrides, needles", [
    (["quantize.bits=5"], ["quantize.bits=5", "2, 3, 4, 8"]),
    (["quantize.group_size=0", "quantize.damp_percent=2"], ["quantize.group_size=0", "quantize.damp_percent=2"]),
])
def test_bad_quantize_settings_exit_2_before_anything_runs(tmp_path, overrides, needles):
    proc = cli("run", *QUICK, f"run.root={tmp_path}", "run.name=B", *overrides)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert not (tmp_path / "B").exists()


@pytest.mark.slow
def test_smollm2_slim_gptq_4bit(tmp_path):
    """GPTQ of the real slim student (10 of SmolLM2's 30 layers, untrained: its perplexity is huge, so only
    size and that the quantized model runs through GPTQModel's kernels are checked), read from the config."""
    proc = cli("run", "pipeline.stages=[evaluate,quantize]", f"data.path={RT_CSV}", "data.eval_size=48",
               "data.train_size=16", "data.unlabeled_size=0", "eval=quick", "quantize.calibration_samples=16",
               f"run.root={tmp_path}", "run.name=real")
    assert proc.returncode == 0, proc.stderr
    student, gptq = json.loads((tmp_path / "real" / "results.json").read_text())["records"][1:]
    assert gptq["size_mb"] < 0.6 * student["size_mb"] and gptq["params"] == student["params"]
    assert 0 <= gptq["accuracy"] <= 1 and gptq["decode_tok_s"] > 0 and gptq["perplexity"] > 1
    print(f"\nslim student {student['size_mb']:.0f} MB -> GPTQ 4-bit g64 {gptq['size_mb']:.0f} MB, quantized in "
          f"{gptq['quantize_s']:.0f} s; decode {student['decode_tok_s']:.0f} -> {gptq['decode_tok_s']:.0f} tok/s")


def test_calibration_reads_train_then_unlabeled_never_eval(tiny_cfg):
    from omegaconf import OmegaConf

    from compress.data import load_splits
    from compress.errors import CompressError
    from compress.stages.quantize import calibration_texts
    from teachers import loading

    tok = loading.load_tokenizer(loading.resolve(tiny_cfg.teacher, "teacher"), tiny_cfg.teacher, "teacher")
    splits = load_splits(tiny_cfg.data)  # 40 train, 40 unlabeled, 40 eval
    cfg = OmegaConf.merge(tiny_cfg, {"quantize": {"calibration_samples": 60}})
    texts = calibration_texts(tok, cfg, splits)
    assert len(texts) == 60
    assert all(e.text[:30] in t for e, t in zip(splits.train, texts[:40]))
    assert all(e.text[:30] in t for e, t in zip(splits.unlabeled, texts[40:]))
    assert not any(e.text[:30] in t for e in splits.eval for t in texts)
    with pytest.raises(CompressError, match="quantize.calibration_samples"):
        calibration_texts(tok, OmegaConf.merge(cfg, {"quantize": {"calibration_samples": 81}}), splits)


def test_too_few_calibration_prompts_exit_2_before_anything_runs(tmp_path):
    proc = cli("run", *QUICK, "data.train_size=2", "data.unlabeled_size=2", f"run.root={tmp_path}", "run.name=C")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "quantize.calibration_samples" in proc.stderr and "never eval" in proc.stderr
    assert not (tmp_path / "C").exists()


def test_gate_follows_the_students_each_stage_hands_on(gptq_run):
    run, _ = gptq_run
    default = cli("check", str(run), "--min-retention", "0.01")
    assert default.returncode == 0 and "(stage export)" in default.stdout and "(onnx-fp32)" in default.stdout
    for stage, shown, hidden in (("quantize", "(gptq) [gptq]", "(recovered)"), ("prune", "(recovered)", "(pruned)")):
        proc = cli("check", str(run), "--min-retention", "0.01", "--stage", stage)
        assert proc.returncode == 0 and f"(stage {stage})" in proc.stdout, proc.stdout + proc.stderr
        assert shown in proc.stdout and hidden not in proc.stdout, proc.stdout
