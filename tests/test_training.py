"""finetune_teacher and distill on tiny random models, with real Lightning Trainers."""
import json

import pytest
import torch

from compress.config import load_config
from compress.errors import CompressError
from conftest import TINY, cli
from students.distill import check_tokenizers
from teachers import finetune, loading

QUICK = TINY + ["finetune=quick", "distill=quick", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = cli("run", *QUICK, "pipeline=full", f"run.root={root}", "run.name=F")
    assert proc.returncode == 0, proc.stderr
    return root / "F", proc


def test_full_pipeline_writes_every_stage(full_run):
    run, proc = full_run
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["00_evaluate", "01_finetune_teacher", "02_distill",
                                                                   "03_prune", "04_quantize", "05_export", "cache"]
    ft, ds = run / "01_finetune_teacher", run / "02_distill"
    assert (ft / "adapter" / "adapter_config.json").is_file() and (ft / "model" / "model.safetensors").is_file()
    assert not (ft / "checkpoints").exists() and (ft / "logs" / "metrics.csv").is_file()
    assert (ds / "model" / "model.safetensors").is_file() and (ds / "pseudo_labels.jsonl").is_file()
    records = json.loads((run / "results.json").read_text())["records"]
    assert [(r["stage"], r["role"], r["variant"]) for r in records][:7] == [
        ("evaluate", "teacher", "base"), ("evaluate", "student", ""), ("finetune_teacher", "teacher", "qlora"),
        ("distill", "student", ""), ("prune", "student", "pruned"), ("prune", "student", "recovered"),
        ("quantize", "student", "gptq")]
    assert [r["backend"] for r in records[7:]] == ["onnxruntime"] * len(records[7:]) and len(records) > 7
    assert (run / "report.md").is_file() and (run / "report.png").is_file()
    for r in records:
        for key in ("accuracy", "retention", "retention_base", "agreement", "decode_tok_s"):
            assert r[key] is not None, (r["stage"], key)


def test_adapter_and_merged_teacher_load_with_peft_and_transformers(full_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = full_run
    ft = run / "01_finetune_teacher"
    cfg = load_config(QUICK).teacher
    assert cfg.method == "qlora"
    merged = AutoModelForCausalLM.from_pretrained(ft / "model").eval()
    base_dir = json.loads((run / "results.json").read_text())["records"][0]["path"]
    # the base the adapter was merged into (teachers/finetune.py::merged_teacher): NF4, de-quantized to fp32
    device = loading.pick_device(cfg.device)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=finetune.bnb_config(cfg, device),
                                                dtype=torch.float32, device_map={"": str(device)})
    base = base.dequantize().to(device="cpu", dtype=torch.float32)
    with finetune.peft_sees_gptqmodel_only_if_imported():
        adapted = PeftModel.from_pretrained(base, ft / "adapter").eval()
    assert adapted.peft_config["default"].r == 16
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m, a = merged(ids).logits, adapted(ids).logits
        with adapted.disable_adapter():
            b = adapted(ids).logits
    # measured on CPU: merged vs base + adapter differ by 2.4e-7 (logits up to 0.66); the adapter itself moves
    # them by 1.6e-2, and the fp32 (not de-quantized) base + adapter is 0.10 away
    assert torch.allclose(m, a, atol=1e-5, rtol=0), (m - a).abs().max()
    assert (a - b).abs().max() > 1e-3  # the adapter changes the logits: the comparison above is not vacuous


def test_distill_logs_each_loss_term(full_run):
    run, _ = full_run
    header = (run / "02_distill" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/soft" in header and "train/pseudo" in header and "train/loss" in header


def test_pseudo_labels_are_reused_on_rerun(full_run):
    run, _ = full_run
    proc = cli("run", *QUICK, "pipeline=full", "distill.temperature=3.0", f"run.root={run.parent}", "run.name=F")
    assert proc.returncode == 0, proc.stderr
    assert "01_finetune_teacher: up to date, skipped" in proc.stderr
    assert "pseudo-labels: reused" in proc.stderr


def test_changed_eval_setting_remeasures_without_retraining(full_run):
    run, _ = full_run
    ft = run / "01_finetune_teacher"
    weights = (ft / "model" / "model.safetensors").stat().st_mtime_ns
    proc = cli("run", *QUICK, "pipeline=full", "distill.temperature=3.0", "eval.decode_tokens=4",
               f"run.root={run.parent}", "run.name=F")
    assert proc.returncode == 0, proc.stderr
    assert "01_finetune_teacher: evaluation settings changed, re-measuring" in proc.stderr
    assert "02_distill: evaluation settings changed, re-measuring" in proc.stderr
    assert (ft / "model" / "model.safetensors").stat().st_mtime_ns == weights  # not retrained
    manifest = json.loads((ft / "manifest.json").read_text())
    assert manifest["eval_hash"]


def test_lora_and_full_methods_train(tmp_path):
    for method in ("lora", "full"):
        proc = cli("run", *QUICK, "pipeline.stages=[evaluate,finetune_teacher]", f"teacher.method={method}",
                   f"run.root={tmp_path}", f"run.name={method}")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / method / "01_finetune_teacher" / "model" / "model.safetensors").is_file()


def test_topk_cache_trains_without_the_teacher(tmp_path):
    proc = cli("run", *QUICK, "pipeline.stages=[evaluate,finetune_teacher,distill]", "distill.topk_cache=8",
               f"run.root={tmp_path}", "run.name=K")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "K" / "02_distill" / "metrics.json").read_text())
    assert metrics["topk_bytes_per_token"] == 8 * 6 + 4
    assert (tmp_path / "K" / "02_distill" / "teacher_topk.safetensors").is_file()


def test_answer_topk_comes_with_the_pseudo_labels_and_trains_without_the_teacher(tmp_path):
    proc = cli("run", *QUICK, "pipeline.stages=[evaluate,finetune_teacher,distill]", "distill.topk_cache=8",
               "distill.soft_on=answer", f"run.root={tmp_path}", "run.name=A")
    assert proc.returncode == 0, proc.stderr
    stage = tmp_path / "A" / "02_distill"
    assert (stage / "teacher_answer_topk.safetensors").is_file()
    assert not (stage / "teacher_topk.safetensors").exists()  # no second teacher pass


def test_hidden_term_trains_from_the_states_kept_by_the_pseudo_label_pass(tmp_path):
    proc = cli("run", *QUICK, "pipeline.stages=[evaluate,distill]", "distill.topk_cache=8", "distill.soft_on=answer",
               "distill.hidden_weight=1", f"run.root={tmp_path}", "run.name=H")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = tmp_path / "H" / "01_distill"
    assert (stage / "teacher_answer_topk.safetensors").is_file() and not (stage / "teacher_topk.safetensors").exists()
    assert "train/hidden" in (stage / "logs" / "metrics.csv").read_text().splitlines()[0]


def test_answer_topk_equals_the_full_cache_at_the_answer_tokens(tiny_cfg, tiny_teacher, tmp_path):
    """The top-K read off the scoring pass (right-padded, one forward per choice: the byte tokenizer makes
    each verbalizer several tokens) equals the top-K of a forward of prompt + chosen answer."""
    from compress import training
    from compress.data import load_splits
    from students import distill

    _, teacher, tok = tiny_teacher
    splits = load_splits(tiny_cfg.data)
    examples = splits.unlabeled[:12]
    answers, cache, _ = distill.teacher_answers(teacher, tok, examples, splits, tiny_cfg, soft_k=5)
    assert max(cache["lengths"].tolist()) > 1  # multi-token answers
    items = training.encode_examples(tok, tiny_cfg.data, [e.text for e in examples], answers, 512, [1] * 12)
    for i, it in enumerate(items):
        it["index"] = i
    got = distill.expand_answer_topk(cache, items)
    full = distill.build_topk_cache(teacher, items, 5, tiny_cfg.distill.temperature, 4, tok.pad_token_id, tmp_path)
    for i, it in enumerate(items):
        at = it["answer_mask"][1:]  # (T-1,) at the item's own length
        w = len(at)
        assert torch.equal(got["indices"][i, :w][at], full["indices"][i, :w][at])
        torch.testing.assert_close(got["values"][i, :w][at].float(), full["values"][i, :w][at].float(),
                                   atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got["tail"][i, :w][at], full["tail"][i, :w][at], atol=2e-3, rtol=2e-3)
        assert torch.isinf(got["tail"][i][~torch.nn.functional.pad(at, (0, got["tail"].shape[1] - w))]).all()


def test_hidden_states_kept_from_the_scoring_pass_equal_the_teacher_on_the_fly(tiny_cfg, tiny_teacher):
    """The hidden-state term read from the states the pseudo-labelling pass kept (multi-token verbalizers:
    one forward per choice) equals the term with the teacher run on the training batch, on the prompt
    positions; an item whose prompt was cut to max_length has no cached states and no term."""
    import copy

    from omegaconf import OmegaConf

    from compress import training
    from compress.data import load_splits
    from students import distill, losses

    _, teacher, tok = tiny_teacher
    splits = load_splits(tiny_cfg.data)
    examples = splits.unlabeled[:10]
    d = OmegaConf.merge(tiny_cfg.distill, {"hidden_weight": 1.0, "soft_on": "answer", "topk_cache": 5})
    student = copy.deepcopy(teacher)
    torch.manual_seed(0)
    with torch.no_grad():  # a student that is not the teacher: a term worth comparing
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    layers = distill.layer_map(student.config, teacher.config, 1.0)
    answers, cache, hidden = distill.teacher_answers(teacher, tok, examples, splits, tiny_cfg, 5, layers)
    lengths = [len(ids) for ids, _ in hidden]
    items = training.encode_examples(tok, tiny_cfg.data, [e.text for e in examples], answers,
                                     sorted(lengths)[-2], [1] * 10)  # the longest prompt gets cut
    for i, it in enumerate(items):
        it["index"] = i
    states = distill.hidden_states_on_prompts(hidden, items)
    assert sum(s is None for s in states) >= 1 and sum(s is not None for s in states) >= 8
    module = distill.DistillModule(student, None, d, distill.expand_answer_topk(cache, items), tok.pad_token_id,
                                   hidden={"layers": layers, "states": states})
    batch = training.collate(tok.pad_token_id)(items)
    got = module.losses(batch)["hidden"]

    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        s_out = student.get_decoder()(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        t_out = teacher.get_decoder()(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    mask = attn.bool() & ~batch["answer_mask"]
    mask[:, 0] = False
    mask[[i for i, s in enumerate(states) if s is None]] = False
    want = losses.hidden_cosine([s_out.hidden_states[j + 1] for j in range(len(layers))],
                                [t_out.hidden_states[i] for i in layers], mask)
    assert want > 0.01
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-2)
    whole = training.encode_examples(tok, tiny_cfg.data, [e.text for e in examples], answers, 10_000, [1] * 10)
    prompt_tokens = sum(int((~it["answer_mask"]).sum()) for it in whole)  # what the memory check counts
    assert distill.hidden_cache_bytes(tok, examples, tiny_cfg, layers, student.config.hidden_size) == (
        prompt_tokens * len(layers) * student.config.hidden_size * 2)


def test_teacher_is_frozen_and_outside_the_module(tiny_teacher):
    from students.distill import DistillModule

    _, teacher, _ = tiny_teacher
    student = loading.load(loading.resolve(load_config(TINY).student, "student"), load_config(TINY).student,
                           "student")[0]
    module = DistillModule(student, teacher, load_config(TINY).distill)
    assert not any(n.startswith("teacher") for n, _ in module.named_parameters())
    assert all(not k.startswith("teacher") for k in module.state_dict())
    opt = module.configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in student.parameters())


def test_vocabulary_mismatch_suggests_pseudo_labels_only(tiny_teacher):
    from transformers import AutoTokenizer

    _, _, tok = tiny_teacher
    other = AutoTokenizer.from_pretrained(tiny_teacher[0])
    other.add_tokens(["<extra>"])
    with pytest.raises(CompressError) as e:
        check_tokenizers(tok, other, soft_weight=1.0)
    assert "distill.soft_weight=0" in e.value.render()
    check_tokenizers(tok, other, soft_weight=0.0)  # pseudo-labels only: fine


def test_4bit_that_cannot_run_names_the_alternative(monkeypatch):
    import bitsandbytes.functional as F

    def no_kernel(*args, **kwargs):  # what a platform without a bitsandbytes 4-bit kernel raises
        raise RuntimeError("no kernel registered for quantize_4bit on this device")

    monkeypatch.setattr(F, "quantize_4bit", no_kernel)
    with pytest.raises(CompressError) as e:
        finetune.check_4bit(torch.device("cpu"))
    msg = e.value.render()
    assert "teacher.method='qlora'" in msg and "teacher.method=lora" in msg and "no kernel" in msg


def test_lora_targets_that_match_nothing_list_the_linear_layers(tiny_teacher):
    _, model, _ = tiny_teacher
    cfg = load_config(TINY + ["teacher.lora.target_modules=[qkv]"]).teacher
    with pytest.raises(CompressError) as e:
        finetune.lora_targets(model, cfg)
    msg = e.value.render()
    assert "no module matched" in msg and "q_proj" in msg and "down_proj" in msg


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_each_divergence_gives_a_finite_soft_loss(tiny_teacher, divergence):
    from compress import training
    from compress.data import load_splits
    from students.distill import DistillModule

    _, teacher, tok = tiny_teacher
    cfg = load_config(TINY + [f"distill.divergence={divergence}"])
    student = loading.load(loading.resolve(cfg.student, "student"), cfg.student, "student")[0]
    splits = load_splits(cfg.data)
    items = training.encode_examples(tok, cfg.data, [e.text for e in splits.train[:4]], [" positive"] * 4, 256, [1] * 4)
    batch = training.collate(tok.pad_token_id)(items)
    parts = DistillModule(student, teacher, cfg.distill).losses(batch)
    assert set(parts) == {"soft", "pseudo", "hidden"} and all(torch.isfinite(v) and v > 0 for v in parts.values())


def _module_batch(tiny_teacher, overrides):
    from compress import training
    from compress.data import load_splits
    from students.distill import DistillModule

    _, teacher, tok = tiny_teacher
    cfg = load_config(TINY + overrides)
    student = loading.load(loading.resolve(cfg.student, "student"), cfg.student, "student")[0]
    splits = load_splits(cfg.data)
    items = training.encode_examples(tok, cfg.data, [e.text for e in splits.train[:4]], [" positive"] * 4, 256, [1] * 4)
    batch = training.collate(tok.pad_token_id)(items)
    return DistillModule(student, teacher, cfg.distill), student, teacher, batch


@pytest.mark.parametrize("soft_on", ["all", "answer"])
def test_losses_on_selected_rows_equal_full_logits_reference(tiny_teacher, soft_on):
    """The module projects only the rows a term reads; the values match full-logit losses."""
    from students import losses

    module, student, teacher, batch = _module_batch(tiny_teacher, [f"distill.soft_on={soft_on}",
                                                                   "distill.hidden_weight=0"])
    parts = module.losses(batch)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    s = student(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
    valid = attn[:, 1:].bool()
    answer = batch["answer_mask"][:, 1:] & valid
    soft_mask = valid if soft_on == "all" else answer
    assert torch.allclose(parts["soft"], losses.forward_kl(s, t, soft_mask, temperature=2.0), atol=1e-5)
    assert torch.allclose(parts["pseudo"], losses.cross_entropy(s, ids[:, 1:], answer), atol=1e-5)


def test_hidden_state_term_pairs_layers_and_trains_student_only(tiny_teacher):
    from students.distill import layer_map

    module, student, teacher, batch = _module_batch(tiny_teacher, ["distill.hidden_weight=1.0"])
    assert module.layer_map == [round((j + 1) * teacher.config.num_hidden_layers / student.config.num_hidden_layers)
                                for j in range(student.config.num_hidden_layers)]
    parts = module.losses(batch)
    assert set(parts) == {"soft", "pseudo", "hidden"} and 0 < parts["hidden"].item() < 2
    sum(parts.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    cut = type(student.config)(**{**student.config.to_dict(), "num_hidden_layers": 2, "compress_kept_layers": [0, 5]})
    deep = type(teacher.config)(**{**teacher.config.to_dict(), "num_hidden_layers": 9})
    assert layer_map(cut, deep, 1.0) == [5, 9]  # layer 0 replaces teacher layers 0-4; the last one ends the stack
    wide = type(teacher.config)(**{**teacher.config.to_dict(), "hidden_size": 128})
    with pytest.raises(CompressError, match="distill.hidden_weight"):
        layer_map(student.config, wide, 1.0)


def test_pseudo_and_hard_labels_alone_do_not_run_the_teacher(tiny_teacher):
    module, _, teacher, batch = _module_batch(tiny_teacher, ["distill.soft_weight=0", "distill.hidden_weight=0",
                                                             "distill.hard_weight=1"])
    calls = []
    hook = teacher.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    try:
        assert set(module.losses(batch)) == {"pseudo", "hard"} and not calls
        module, *_ = _module_batch(tiny_teacher, ["distill.soft_weight=0", "distill.hidden_weight=1"])
        module.losses(batch)
        assert calls  # the hidden-state term reads the teacher
    finally:
        hook.remove()


def test_lora_injection_leaves_gptqmodel_unimported(tiny_teacher):
    """peft would import GPTQModel (installed for `quantize`) to check LoRA targets: it rewrites HF_HOME and slows
    the whole process. The guard keeps it out; checked in a fresh interpreter, where nothing imported it yet."""
    import subprocess
    import sys
    from pathlib import Path

    folder = tiny_teacher[0]
    code = f"""
import os, sys
from compress.config import load_config
from teachers import finetune
from conftest import TINY
cfg = load_config(TINY + ["teacher.method=lora"])
home = os.environ.get("HF_HOME")
from pathlib import Path
model, _ = finetune.trainable_model(Path({str(folder)!r}), cfg.teacher)
assert any("lora_A" in n for n, _ in model.named_parameters())
assert "gptqmodel" not in sys.modules, "peft imported gptqmodel"
assert os.environ.get("HF_HOME") == home
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_freeze_embeddings_trains_the_layers_only(tmp_path):
    from safetensors.torch import load_file

    proc = cli("run", *TINY, "distill=quick", "distill.freeze_embeddings=true", "pipeline.stages=[evaluate,distill]",
               "eval.latency=false", f"run.root={tmp_path}", "run.name=Z")
    assert proc.returncode == 0, proc.stderr
    assert "M trained)" in proc.stderr
    run = tmp_path / "Z"
    before_dir = json.loads((run / "00_evaluate" / "metrics.json").read_text())["records"][1]["path"]
    before = load_file(f"{before_dir}/model.safetensors")
    after = load_file(run / "01_distill" / "model" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert torch.equal(before[emb], after[emb])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_auto_precision_is_bf16_for_distillation_only_on_a_bf16_cpu(monkeypatch):
    from compress import training

    tcfg = load_config(["trainer=cpu", "trainer.accelerator=cpu"]).trainer
    assert training.precision(tcfg) == "32-true"  # fine-tuning: fp32 on CPU
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.precision(tcfg, cpu_bf16=True) == "bf16-mixed"
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert training.precision(tcfg, cpu_bf16=True) == "32-true"
    tcfg.precision = "32-true"
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.precision(tcfg, cpu_bf16=True) == "32-true"  # an explicit setting wins


def test_on_policy_steps_are_spread_evenly(tiny_teacher):
    module, *_ = _module_batch(tiny_teacher, ["distill.on_policy_ratio=0.25"])
    assert [s for s in range(12) if module.on_policy(s)] == [3, 7, 11]
    off, *_ = _module_batch(tiny_teacher, [])
    assert not any(off.on_policy(s) for s in range(50))


def test_student_answers_keep_the_prompt_and_the_teacher_scores_them(tiny_teacher):
    """On-policy: each prompt kept as it was, the answer replaced by the student's sample of at most the same
    length; the step's loss is the soft term (and hidden states) only, with gradients for the student."""
    from compress import training

    module, student, teacher, _ = _module_batch(tiny_teacher, ["distill.on_policy_ratio=1",
                                                               "distill.hidden_weight=1"])
    tok = tiny_teacher[2]
    texts = ["good", "a much longer review, with commas and more words in it", "meh", "fine, I guess"]
    answers = [" positive", " negative, clearly and at length", " x", " positive\n"]
    cfg = load_config(TINY)
    batch = training.collate(tok.pad_token_id)(training.encode_examples(tok, cfg.data, texts, answers, 256, [1] * 4))
    module.pad_id, module.eos = tok.pad_token_id, [tok.eos_token_id]
    torch.manual_seed(0)
    new = module.student_answers(batch)
    assert new["on_policy"] and new["input_ids"].shape[0] == 4
    for i in range(4):
        start = int(batch["answer_mask"][i].int().argmax())
        assert torch.equal(new["input_ids"][i, :start], batch["input_ids"][i, :start])  # the prompt, untouched
        n_new = int(new["answer_mask"][i].sum())
        assert 1 <= n_new <= int(batch["answer_mask"][i].sum())
        assert int(new["attention_mask"][i].sum()) == start + n_new
        assert new["answer_mask"][i, start:start + n_new].all()
    parts = module.losses(new)
    assert set(parts) == {"soft", "hidden"} and all(torch.isfinite(v) for v in parts.values())
    sum(parts.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_on_policy_distillation_trains_and_logs_its_own_term(tmp_path):
    proc = cli("run", *QUICK, "pipeline.stages=[evaluate,distill]", "distill.on_policy_ratio=0.5",
               f"run.root={tmp_path}", "run.name=P")
    assert proc.returncode == 0, proc.stderr
    header = (tmp_path / "P" / "01_distill" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/soft_on_policy" in header and "train/pseudo" in header and "train/pseudo_on_policy" not in header


def test_auto_layers_through_the_stages(tmp_path):
    proc = cli("run", *QUICK, "student=smollm2-slim", "student.keep_layers=auto", "student.keep_every=2",
               "student.calibration_examples=4", "pipeline.stages=[evaluate,distill]", f"run.root={tmp_path}",
               "run.name=A")
    assert proc.returncode == 0, proc.stderr
    assert "student layers by importance" in proc.stdout + proc.stderr
    config = json.loads((tmp_path / "A" / "01_distill" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and len(config["compress_kept_layers"]) == 1


def test_length_grouped_batches_cover_each_pass_once_and_cut_padding():
    """StepBatches with lengths: one pass still shows every example once, a resumed or sharded run
    sees the same batches, and a batch holds examples of similar length."""
    from compress.training import StepBatches

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 120, (1000,), generator=gen).tolist()
    n_steps, bs = 125, 8  # 125 x 8 = one pass over the 1000 examples, ending inside a group

    def batches(lengths, start=0, rank=0, world=1, size=bs):
        return list(StepBatches(1000, size, n_steps, seed=3, where=lambda: (start, rank, world), lengths=lengths))

    grouped, plain = batches(lengths), batches(None)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert batches(lengths, start=50) == grouped[50:]  # resumed at step 50
    halves = zip(batches(lengths, rank=0, world=2, size=4), batches(lengths, rank=1, world=2, size=4))
    assert [a + b for a, b in halves] == grouped  # two ranks of 4 = one process of 8

    def padded(bs_):  # tokens a step computes over the tokens it holds
        return sum(max(lengths[i] for i in b) * len(b) for b in bs_) / sum(lengths[i] for b in bs_ for i in b)

    assert padded(grouped) < 1.05 < 1.2 < padded(plain)
    assert grouped[:5] != sorted(grouped[:5], key=lambda b: lengths[b[0]])  # batches come in random order


def test_fused_adamw_is_clipped_by_the_callback_as_lightning_would():
    """Under bf16 autocast Lightning will not clip a fused AdamW; make_trainer clips with a callback
    instead, to the same global norm."""
    from pathlib import Path

    from compress import training

    cfg = load_config([])
    trainer = training.make_trainer(cfg.trainer, cfg.distill, Path("/nonexistent-never-written"), False,
                                    cpu_bf16=True)
    assert trainer.gradient_clip_val is None
    assert any(isinstance(c, training.ClipGradNorm) for c in trainer.callbacks)
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    opt = training.optimizer_and_schedule(params, cfg.distill, trainer)["optimizer"]
    assert opt.defaults["fused"] is True
    params[0].grad, params[1].grad = torch.full((3, 4), 3.0), torch.full((5,), -4.0)
    scale = cfg.distill.max_grad_norm / (12 * 9 + 5 * 16) ** 0.5  # max norm / global norm
    expected = [torch.full((3, 4), 3.0 * scale, dtype=torch.float64), torch.full((5,), -4.0 * scale, dtype=torch.float64)]
    training.ClipGradNorm(cfg.distill.max_grad_norm).on_before_optimizer_step(trainer, None, opt)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=0)


def test_training_attention_is_eager_under_bf16_on_a_cpu_only(tiny_cfg, tmp_path):
    """SDPA's bf16 backward is slow on a CPU: bf16 training switches the running model to eager attention,
    fp32 training and a user's own choice keep theirs, and the saved model names none."""
    import lightning as L
    from omegaconf import OmegaConf

    from compress import training

    folder = loading.resolve(tiny_cfg.student, "student")
    for precision, own, expected in (("bf16-mixed", None, "eager"), ("32-true", None, "sdpa"),
                                     ("bf16-mixed", "sdpa", "sdpa")):
        model, _ = loading.load(folder, tiny_cfg.student, "student")
        model.set_attn_implementation("sdpa")
        trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False)
        training.train_attention(model, OmegaConf.create({"attn_implementation": own}), trainer)
        assert model.config._attn_implementation == expected, (precision, own)
    model.set_attn_implementation("eager")
    model.save_pretrained(tmp_path / "saved")
    assert "attn_implementation" not in (tmp_path / "saved" / "config.json").read_text()


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_answer_loss_equals_the_full_logits_loss_in_float64(tiny_cfg, family):
    """The head only at answer-predicting positions gives transformers' `labels` loss and its gradients
    (rows whose answers sit at different positions; Gemma-2's final-logit soft-capping kept)."""
    from transformers import AutoModelForCausalLM

    from compress import training

    folder = loading.build_random(tiny_cfg.teacher.random, family)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float64, attn_implementation="eager")
    if family == "gemma2":
        model.config.final_logit_softcapping = 5.0
    g = torch.Generator().manual_seed(0)
    items = [{"input_ids": torch.randint(3, 200, (n,), generator=g), "kind": 0,
              "answer_mask": torch.arange(n) >= n - a} for n, a in [(9, 2), (14, 1), (6, 3)]]
    batch = training.collate(0)(items)

    def full():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    assert torch.allclose(finetune.answer_loss(model, batch), full(), rtol=0, atol=1e-12)
    for a, b in zip(grads(finetune.answer_loss(model, batch)), grads(full()), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tied", [True, False])
def test_cast_weights_restores_all_but_the_rounding_autocast_does_anyway(tiny_cfg, tied):
    """The bf16 pseudo-labelling pass casts the teacher, and casts it back: norms, embeddings (a head tied to
    them too) and buffers come back bit for bit; the other Linear weights come back bf16-rounded, so bf16
    autocast computes exactly what it did before."""
    from transformers import AutoModelForCausalLM

    from compress import training

    model = AutoModelForCausalLM.from_pretrained(loading.build_random(tiny_cfg.teacher.random),
                                                 tie_word_embeddings=tied)
    before = {**{n: p.detach().clone() for n, p in model.named_parameters()},
              **{n: b.clone() for n, b in model.named_buffers()}}
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
    with training.cast_weights(model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        model(input_ids=ids)
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert after.keys() == before.keys()
    for n, t in after.items():
        assert t.dtype == before[n].dtype, n
        kept = before[n].to(torch.bfloat16).float() if n in linear and not (tied and "lm_head" in n) else before[n]
        assert torch.equal(t, kept), n
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight or not tied
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=ids).logits, want)
