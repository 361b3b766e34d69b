"""The real SmolLM2-135M-Instruct through the CLI: QLoRA fine-tuning, then distillation into its slim student."""
import json

import pytest

from conftest import RT_CSV, cli


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
