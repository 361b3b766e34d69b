"""`compress plan`: memory estimates against the published rule of thumb for 7B models."""
import pytest

from compress import plan
from compress.config import load_config
from conftest import cli

GB = 1e9  # the rule of thumb is in decimal gigabytes


def _rows(*overrides, device="cuda"):
    cfg = load_config(["teacher=llama7b", "student=tinyllama", *overrides])
    return {(r["what"], r["checkpointing"]): r["total"] for r in plan.plan(cfg, device)["rows"]}


def test_7b_matches_the_rule_of_thumb_within_30_percent():
    rows = _rows()  # default budget: batch 8 x 256 tokens, bf16 on a GPU
    assert plan.shape(load_config(["teacher=llama7b"]).teacher, "teacher").params() == pytest.approx(6.74e9, rel=0.01)
    # full fine-tuning about 80 GB+, LoRA about 16 GB, QLoRA about 8 GB (the latter two with gradient checkpointing)
    for key, rule in [(("finetune full", False), 80), (("finetune lora", True), 16), (("finetune qlora", True), 8)]:
        assert rows[key] / GB == pytest.approx(rule, rel=0.30), (key, rows[key] / GB)
    assert rows[("finetune qlora", True)] < rows[("finetune lora", True)] < rows[("finetune full", True)]
    assert rows[("finetune lora", False)] > rows[("finetune lora", True)]  # checkpointing saves activations


def test_batch_and_length_scale_the_activations():
    small, big = _rows("finetune.batch_size=1"), _rows("finetune.batch_size=16")
    assert big[("finetune lora", False)] > small[("finetune lora", False)]
    assert big[("finetune full", True)] - small[("finetune full", True)] < 4 * GB  # weights and states dominate


def test_plan_command_prints_the_table_and_what_fits():
    proc = cli("plan", "teacher=llama7b", "student=tinyllama", "--gpu-mem", "24GB")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for word in ("finetune full", "finetune qlora", "distill", "fits 24 GiB", "qlora"):
        assert word in text, word
    assert "teacher fine-tuning fits with lora + gradient checkpointing, qlora" in text


def test_plan_of_an_unknown_architecture_or_bad_size_exits_2(tmp_path):
    proc = cli("plan", "teacher.hub_id=someone/unknown-model", "--gpu-mem", "24GB")
    assert proc.returncode == 2 and "teacher.hub_id='someone/unknown-model'" in proc.stderr
    assert "teacher.path=" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("plan", "--gpu-mem", "lots")
    assert proc.returncode == 2 and "--gpu-mem='lots'" in proc.stderr
