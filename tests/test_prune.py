"""Stage `prune`: torch-pruning on tiny random Llamas (GQA: 4 query heads in 2 KV groups), the config
round trip, importance that removes what matters least, and the stage through the CLI."""
import json

import pytest
import torch

from conftest import RT_CSV, TINY, cli


def _cfg(*overrides):
    from compress.config import load_config

    return load_config([*TINY, "prune=quick", *overrides])


def _tiny_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    folder, _, tok = tiny_teacher
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tok


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


@pytest.mark.parametrize("overrides, shape", [
    (["prune.mlp_ratio=0.5"], {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "num_hidden_layers": 2}),
    (["prune.mlp_ratio=0.5", "prune.heads=query", "prune.head_ratio=0.5"],
     {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2}),
    (["prune.mlp_ratio=0.25", "prune.heads=kv_groups", "prune.head_ratio=0.5", "prune.drop_layers=[0]"],
     {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1}),
    (["prune.mlp_ratio=0.5", "prune.importance=magnitude", "prune.heads=query", "prune.head_ratio=0.5"],
     {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2}),
])
def test_pruned_model_round_trips_through_save_pretrained(tiny_teacher, tiny_cfg, tmp_path, overrides, shape):
    from transformers import AutoModelForCausalLM

    from compress.data import load_splits
    from students.prune import prune

    cfg = _cfg(*overrides)
    model, tok = _tiny_model(tiny_teacher)
    shapes = prune(model, tok, cfg, load_splits(cfg.data))
    assert shapes["after"] == shape
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.head_dim == 16 and sum(p.numel() for p in again.parameters()) == \
        sum(p.numel() for p in model.parameters())
    ids = torch.tensor([tok("a movie about pruning")["input_ids"]])  # (1, T)
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids))
    with torch.no_grad():  # KV-cache decoding works with the new head counts
        out = again.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_importance_removes_the_units_that_do_nothing(tiny_teacher, importance):
    """Half of every MLP's units zeroed: pruning half must remove exactly those, leaving the function intact;
    one zeroed query head per KV group likewise."""
    from compress.data import load_splits
    from students.prune import prune

    cfg = _cfg("prune.mlp_ratio=0.5", "prune.heads=query", "prune.head_ratio=0.5", f"prune.importance={importance}")
    model, tok = _tiny_model(tiny_teacher)
    with torch.no_grad():
        for layer in model.model.layers:
            dead = torch.arange(0, 128, 2)  # every other unit
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[:, dead] = 0
            for head in (1, 2):  # one query head in each of the 2 KV groups (heads 0-1, 2-3)
                layer.self_attn.q_proj.weight[head * 16:(head + 1) * 16] = 0
                layer.self_attn.o_proj.weight[:, head * 16:(head + 1) * 16] = 0
    ids = torch.tensor([tok("zero weights carry no signal")["input_ids"]])
    before = _logits(model, ids)
    prune(model, tok, cfg, load_splits(cfg.data))
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 64
    # zeroed query heads still add softmax-weighted zeros; the layer output is unchanged
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def prune_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = cli("run", *TINY, "prune=quick", "distill=quick", "pipeline.stages=[evaluate,prune]",
               f"run.root={root}", "run.name=P")
    assert proc.returncode == 0, proc.stderr
    return root / "P", proc


def test_prune_stage_records_before_and_after_recovery(prune_run):
    run, proc = prune_run
    stage = run / "01_prune"
    assert {"model", "pruned", "logs", "pseudo_labels.jsonl", "metrics.json", "DONE"} <= {p.name for p in stage.iterdir()}
    records = json.loads((run / "results.json").read_text())["records"]
    assert [(r["stage"], r["role"], r["variant"], r["output"]) for r in records] == [
        ("evaluate", "teacher", "base", True), ("evaluate", "student", "", True), ("prune", "student", "pruned", False),
        ("prune", "student", "recovered", True)]
    for r in records[2:]:
        assert 0 <= r["accuracy"] <= 1 and r["perplexity"] > 0 and r["retention"] >= 0
    assert records[2]["params"] < records[1]["params"] and records[3]["params"] == records[2]["params"]
    config = json.loads((stage / "model" / "config.json").read_text())
    assert config["intermediate_size"] == 64  # tiny-random student: 128 -> 64
    metrics = json.loads((stage / "metrics.json").read_text())
    assert "random" in metrics["input_model"]  # the configured student: evaluate's student role
    assert "pruned" in proc.stdout and "recovered" in proc.stdout  # both rows in the table


@pytest.mark.parametrize("overrides, needles", [
    (["prune.mlp_ratio=1.5", "prune.head_ratio=-0.1"], ["prune.mlp_ratio=1.5", "prune.head_ratio=-0.1",
                                                        "must be in [0, 1)"]),
    (["prune.targets=[fc1]"], ["prune.targets='fc1'", "no module matched", "model.layers.*.mlp.gate_proj"]),
    (["prune.heads=all"], ["prune.heads='all'", "none, query, kv_groups"]),
    (["prune.drop_layers=[5]"], ["prune.drop_layers=[5]", "[0, 0]"]),
])
def test_bad_prune_settings_exit_2(prune_run, overrides, needles):
    run, _ = prune_run
    saved = _stage_files(run)
    proc = cli("run", *TINY, "prune=quick", "distill=quick", "pipeline.stages=[evaluate,prune]",
               f"run.root={run.parent}", "run.name=P", *overrides)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert _stage_files(run) == saved


def _stage_files(run):
    return {p: p.read_bytes() for p in run.glob("0*/**/*") if p.is_file()}


@pytest.mark.slow
def test_smollm2_slim_prune_with_recovery(tmp_path):
    """The real slim student (10 of SmolLM2's 30 layers): MLP halved by Taylor importance, a few recovery steps."""
    proc = cli("run", "pipeline.stages=[evaluate,prune]", f"data.path={RT_CSV}", "data.eval_size=48",
               "data.train_size=32", "data.unlabeled_size=32", "eval=quick", "distill=quick",
               "prune.calibration_batches=2", "prune.recovery_steps=4", f"run.root={tmp_path}", "run.name=real")
    assert proc.returncode == 0, proc.stderr
    records = json.loads((tmp_path / "real" / "results.json").read_text())["records"]
    student, pruned, recovered = records[1:]
    config = json.loads((tmp_path / "real" / "01_prune" / "model" / "config.json").read_text())
    assert config["intermediate_size"] == 768 and config["num_hidden_layers"] == 10
    assert pruned["params"] < 0.85 * student["params"]
    assert recovered["perplexity"] < pruned["perplexity"]
    print(f"\nslim student ppl {student['perplexity']:.1f} -> pruned {pruned['perplexity']:.1f} -> "
          f"recovered (4 steps) {recovered['perplexity']:.1f}")
