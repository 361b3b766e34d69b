"""Every common decoder family runs the whole `full` pipeline: a tiny random model of the real transformers
class as teacher, a student cut from its layers, QLoRA, distillation with hidden states, pruning, GPTQ,
ONNX export + int8, every evaluation. What a family cannot do exits 2 before any stage starts."""
import json

import pytest
import torch

from compress.config import load_config
from conftest import RT_CSV, TINY, cli
from teachers.loading import ARCHITECTURES

FAMILY = ["teacher=tiny-random", "student=smollm2-slim", "student.keep_layers=[0]", f"data.path={RT_CSV}",
          "data.eval_size=40", "data.train_size=40", "data.unlabeled_size=40", "eval=quick", "finetune=quick",
          "distill=quick", "distill.hidden_weight=1", "prune=quick", "quantize=quick", "trainer.progress_bar=false",
          "trainer.log_every=1", "pipeline=full", "export.variants=[fp32,int8]"]


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_full_pipeline_runs_on_every_decoder_family(tmp_path, family):
    proc = cli("run", *FAMILY, f"teacher.architecture={family}", f"run.root={tmp_path}", "run.name=F")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "F"
    records = json.loads((run / "results.json").read_text())["records"]
    assert [r["stage"] for r in records][:7] == ["evaluate", "evaluate", "finetune_teacher", "distill", "prune",
                                                 "prune", "quantize"]
    assert {r["variant"] for r in records if r["stage"] == "export"} == {"onnx-fp32", "onnx-int8"}
    assert all(r["accuracy"] is not None and r["perplexity"] > 0 for r in records)
    for stage in ("00_evaluate", "02_distill", "03_prune", "04_quantize"):
        model = run / stage / ("model" if stage != "00_evaluate" else "")
        if (model / "config.json").is_file():
            assert json.loads((model / "config.json").read_text())["model_type"] == family
    assert "train/hidden" in (run / "02_distill" / "logs" / "metrics.csv").read_text()  # hidden states distilled
    shapes = json.loads((run / "03_prune" / "metrics.json").read_text())["shapes"]
    assert shapes["after"]["intermediate_size"] < shapes["before"]["intermediate_size"]
    parity = json.loads((run / "05_export" / "parity.json").read_text())["fp32"]
    assert parity["top1"] >= 0.99 and parity["max_abs_diff"] < 1e-2


def test_gqa_aware_head_pruning_on_every_family_with_separate_projections(family_cfg):
    """One query head of each KV group goes (4 heads in 2 groups -> 2 in 2); the model still runs."""
    from compress.data import load_splits
    from students import prune
    from teachers import loading

    cfg, family = family_cfg
    model, tok = loading.load(loading.resolve(cfg.teacher, "teacher"), cfg.teacher, "teacher")
    prune.check(model, cfg.prune)
    shapes = prune.prune(model, tok, cfg, load_splits(cfg.data))
    assert shapes["after"]["num_attention_heads"] == 2 and shapes["after"]["num_key_value_heads"] == 2
    assert model.config.model_type == family
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()


@pytest.fixture(params=[f for f in ARCHITECTURES if f != "phi3"])
def family_cfg(request):
    return load_config([*TINY, f"teacher.architecture={request.param}", "prune=quick", "prune.heads=query",
                        "prune.head_ratio=0.5", "prune.mlp_ratio=0"]), request.param


def test_head_pruning_a_phi3_exits_2_before_any_stage(tmp_path):
    proc = cli("run", *FAMILY, "teacher.architecture=phi3", "prune.heads=query", "prune.head_ratio=0.5",
               f"run.root={tmp_path}", "run.name=P")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "prune.heads='query'" in proc.stderr and "qkv_proj" in proc.stderr and "prune.heads=none" in proc.stderr
    assert not (tmp_path / "P").exists()


def test_unknown_architecture_lists_the_families(tmp_path):
    proc = cli("run", *FAMILY, "teacher.architecture=gpt5", "pipeline=evaluate", f"run.root={tmp_path}", "run.name=U")
    assert proc.returncode == 2 and "teacher.architecture='gpt5'" in proc.stderr
    assert "llama, mistral, qwen2, qwen3, phi3, gemma2" in proc.stderr
