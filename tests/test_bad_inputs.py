"""Every kind of bad input: exit code 2, one message naming key, value and fix, no traceback,
and nothing saved is lost (a finished stage of the run is byte-for-byte intact afterwards).

Each case runs `compress run` on a run folder whose `00_evaluate` is finished. Elsewhere:
the locked run folder (tests/test_resume.py), `compress plan` with a bad size or an unknown
architecture (tests/test_plan.py), `compress check` and `compress bench` (tests/test_report.py),
trainer settings Lightning refuses (tests/test_trainer_checks.py), bad data files in detail
(tests/test_data.py).
"""
import errno
import json
import shutil

import pytest
import torch

from compress.cli import main
from conftest import TINY

FAST = TINY + ["eval.latency=false", "eval.perplexity=false", "pipeline=evaluate", "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a finished `00_evaluate` stage."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", *FAST, f"run.root={root}", "run.name=N"]) == 0
    assert (root / "N" / "00_evaluate" / "DONE").exists()
    return root / "N"


def _snapshot(run):
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".tmp" not in str(p.relative_to(run))}


def _bad(run, capsys, *overrides, pipeline=("pipeline=evaluate",)):
    """Run `compress run` with bad overrides on `run`; check exit 2, no traceback, nothing lost; the message."""
    saved = _snapshot(run)
    capsys.readouterr()
    code = main(["run", *FAST, *pipeline, f"run.root={run.parent}", f"run.name={run.name}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    after = _snapshot(run)
    assert all(after.get(p) == data for p, data in saved.items()), "a saved file changed or vanished"
    assert (run / "00_evaluate" / "DONE").exists() and not (run / ".lock").exists()
    return " ".join(err.split())


def _has(msg: str, *needles: str) -> None:
    for needle in needles:
        assert needle in msg, (needle, msg[-2000:])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, needles", [
    pytest.param(["teacher=gpt5"], ["teacher='gpt5'", "no such teacher preset", "llama7b, smollm2-135m", "tiny-random"],
                 id="unknown-preset"),
    pytest.param(["eval.batchsize=2"], ["eval.batchsize", "unknown key", "did you mean `batch_size`"], id="unknown-key"),
    pytest.param(["data.eval_size=many"], ["data.eval_size='many'", "expected a value of type Integer"],
                 id="wrong-type"),
    pytest.param(["data.eval_size=-5", "data.train_size=-1"],
                 ["data.eval_size=-5", "data.train_size=-1", "must be >= 1", "must be >= 0", "2 problems"],
                 id="negative-sizes"),
    pytest.param(["finetune.batch_size=0"], ["finetune.batch_size=0", "must be >= 1"], id="zero-batch-size"),
    pytest.param(["distill.lr=0", "finetune.lr=-0.0001"], ["distill.lr=0", "finetune.lr=-0.0001",
                                                          "must be > 0, e.g. 1e-4"], id="zero-and-negative-lr"),
    pytest.param(["distill.temperature=0"], ["distill.temperature=0", "must be > 0"], id="zero-temperature"),
    pytest.param(["distill.pseudo_batch_size=0"], ["distill.pseudo_batch_size=0", "must be >= 1"],
                 id="zero-pseudo-batch"),
    pytest.param(["student.keep_layers=first", "student.keep_layers=[a]"],
                 ["student.keep_layers=['a']", "auto (chosen by measured importance)"], id="keep-layers-word"),
    pytest.param(["distill.on_policy_ratio=1.5", "distill.on_policy_temperature=0"],
                 ["distill.on_policy_ratio=1.5", "in [0, 1]", "distill.on_policy_temperature=0"], id="on-policy-range"),
    pytest.param(["distill.on_policy_ratio=0.5", "distill.topk_cache=8", "distill.hidden_weight=0"],
                 ["distill.on_policy_ratio=0.5", "topk_cache=0"], id="on-policy-with-topk-cache"),
    pytest.param(["distill.quant_aware_steps=-1", "distill.quant_aware_block_size=24"],
                 ["distill.quant_aware_steps=-1", "must be >= 0", "distill.quant_aware_block_size=24",
                  "power of 2"], id="quant-aware-range"),
    pytest.param(["distill.quant_aware_steps=10", "trainer.strategy=fsdp"],
                 ["distill.quant_aware_steps=10", "trainer.strategy=fsdp", "use trainer.strategy=ddp"],
                 id="quant-aware-with-fsdp"),
    pytest.param(["distill.temperature=-1.5"], ["distill.temperature=-1.5", "must be > 0"], id="negative-temperature"),
    pytest.param(["distill.soft_weight=0", "distill.pseudo_weight=0", "distill.hard_weight=0", "distill.hidden_weight=0"],
                 ["distill.soft_weight=0", "all 0", "set at least one > 0"], id="no-loss-term"),
    pytest.param(["distill.hidden_weight=0.5", "distill.topk_cache=8", "distill.soft_on=all"],
                 ["distill.topk_cache=8", "hidden_weight=0"],
                 id="hidden-states-with-topk-cache"),
    pytest.param(["eval.cpu_dtypes=[float16]", "student.attn_implementation=flash"],
                 ["eval.cpu_dtypes=['float16']", "float32 and/or bfloat16", "student.attn_implementation='flash'",
                  "choose sdpa, eager"], id="calibration-candidates"),
    pytest.param(["teacher.method=qat"], ["teacher.method='qat'", "qlora, lora, full"], id="unknown-method"),
    pytest.param(["trainer.strategy=horovod"], ["trainer.strategy='horovod'", "ddp, fsdp, deepspeed"],
                 id="unknown-strategy"),
    pytest.param(["teacher.device=cuda"], ["teacher.device='cuda'", "CUDA is not available", "auto or cpu"],
                 id="cuda-without-a-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_config(run, capsys, overrides, needles):
    _has(_bad(run, capsys, *overrides), *needles)


def test_quant_aware_block_other_than_the_exports(run, capsys):
    msg = _bad(run, capsys, "distill.quant_aware_steps=2", "distill.quant_aware_block_size=64",
               "export.variants=[fp32,int4]", pipeline=("pipeline=distill_export",))
    _has(msg, "distill.quant_aware_block_size=64", "export.int4_block_size=32", "same size")


@pytest.mark.parametrize("name", ["a/b", "../escape", ".."])
def test_run_name_with_a_path(run, capsys, name):
    _has(_bad(run, capsys, f"run.name={name}"), f"run.name='{name}'", "no '/' or '..'", "inside run.root")
    assert not (run.parent.parent / "escape").exists() and not (run / "b").exists()


# --------------------------------------------------------------------------- data


def _jsonl(tmp_path, rows) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_empty_dataset(run, capsys, tmp_path):
    path = _jsonl(tmp_path, [])
    _has(_bad(run, capsys, "data=jsonl", f"data.path={path}", "data.verbalizers={a: ' A', b: ' B'}"),
         f"data.path='{path}'", "holds no examples")


def test_one_class_dataset(run, capsys, tmp_path):
    path = _jsonl(tmp_path, [{"text": f"t{i}", "label": "a"} for i in range(130)])
    _has(_bad(run, capsys, "data=jsonl", f"data.path={path}", "data.verbalizers={a: ' A', b: ' B'}"),
         "data.label_field='label'", "only one class ('a')")


def test_labels_not_in_the_verbalizer(run, capsys):
    _has(_bad(run, capsys, "data.verbalizers={fresh: ' good'}"), "data.verbalizers",
         "labels with no verbalizer: ['rotten']")


def test_missing_data_file(run, capsys):
    _has(_bad(run, capsys, "data.path=/no/such/file.csv"), "data.path='/no/such/file.csv'", "no such file")


# --------------------------------------------------------------------------- models


def test_missing_model_folder(run, capsys):
    _has(_bad(run, capsys, "teacher.path=/no/such/model"), "teacher.path='/no/such/model'", "no such file or folder")


def test_truncated_safetensors(run, capsys, tmp_path, tiny_teacher):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_teacher[0], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _has(_bad(run, capsys, f"teacher.path={bad}"), f"teacher.path='{bad}'", "truncated or corrupt",
         "re-download or rebuild it")


def test_truncated_gguf(run, capsys, tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    _has(_bad(run, capsys, f"teacher.path={gguf}"), f"teacher.path='{gguf}'", "cannot read this GGUF file",
         "truncated")


def test_pickle_weights_refused(run, capsys, tmp_path, tiny_teacher):
    pkl = tmp_path / "pkl"
    tiny_teacher[1].save_pretrained(pkl, safe_serialization=False)
    assert (pkl / "pytorch_model.bin").is_file()
    _has(_bad(run, capsys, f"teacher.path={pkl}"), f"teacher.path='{pkl}'", "pickle weights",
         "convert them to safetensors", "teacher.allow_pickle=true")


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: run code when loaded
        import os

        return (os.system, (f"touch {_Payload.marker}",))


def test_allowed_pickle_loads_tensors_only(run, capsys, tmp_path, tiny_teacher):
    import torch

    evil = tmp_path / "evil"
    tiny_teacher[1].save_pretrained(evil, safe_serialization=False)
    _Payload.marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload()}, evil / "pytorch_model.bin")
    msg = _bad(run, capsys, f"teacher.path={evil}", "teacher.allow_pickle=true")
    _has(msg, f"teacher.path='{evil}'", "cannot load the model")
    assert not _Payload.marker.exists()  # loaded with weights_only=True: the payload never ran


def test_tokenizer_mismatch_for_soft_labels(run, capsys, tmp_path, tiny_teacher):
    from transformers import AutoTokenizer

    other = tmp_path / "student"
    shutil.copytree(tiny_teacher[0], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<new>"])
    tok.save_pretrained(other)
    msg = _bad(run, capsys, f"student.path={other}", "distill=quick", pipeline=("pipeline.stages=[evaluate,distill]",))
    _has(msg, "distill.soft_weight=1.0", "tokenizers differ", "distill.soft_weight=0")


def test_lora_targets_that_match_nothing(tmp_path, capsys):
    """Found when fine-tuning loads the teacher; a changed teacher config would re-run `run`'s evaluation,
    so this case has a run folder of its own."""
    capsys.readouterr()
    code = main(["run", *FAST, "pipeline.stages=[evaluate,finetune_teacher]", "finetune=quick", f"run.root={tmp_path}",
                 "run.name=L", "teacher.lora.target_modules=[nope]"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    _has(" ".join(err.split()), "teacher.lora.target_modules=['nope']", "no module matched", "q_proj", "down_proj")
    assert not (tmp_path / "L" / ".lock").exists()


def test_hub_model_offline(run, capsys):
    _has(_bad(run, capsys, "teacher=llama7b"), "teacher.hub_id='meta-llama/Llama-2-7b-hf'", "cannot be reached",
         "teacher.path=", "teacher=smollm2-135m", "teacher=tiny-random")


def test_gated_model_needs_licence_and_token(run, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        raise GatedRepoError("401 Client Error: access to model meta-llama/Llama-2-7b-hf is restricted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    msg = _bad(run, capsys, "teacher=llama7b")
    _has(msg, "teacher.hub_id='meta-llama/Llama-2-7b-hf'", "gated", "accept its licence", "HF_TOKEN")
    assert "hf_secret_value" not in msg


# --------------------------------------------------------------------------- the disk


def test_disk_full_while_writing_a_stage(run, capsys, monkeypatch):
    """No size-limited filesystem can be mounted without root here: the stage's first
    metrics write raises ENOSPC as a full disk does. The finished stage stays intact and
    rerunning the command after freeing space works."""
    from compress import artifact

    real = artifact.write_json

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(artifact, "write_json", full)
    msg = _bad(run, capsys, "data.eval_size=30")  # a changed config: evaluate runs again, then the disk is full
    _has(msg, "disk full while writing", "metrics.json", "free space or set run.root=", "finished stages are kept")
    monkeypatch.setattr(artifact, "write_json", real)
