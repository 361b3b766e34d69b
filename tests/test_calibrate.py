"""Per-model CPU settings by measurement: candidates, the cached choice, and what a record reports."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from compress import calibrate
from compress.config import load_config
from conftest import TINY


def _cfg(*overrides: str):
    return load_config([*TINY, *overrides])


def test_candidates_fix_the_axes_the_user_set():
    cfg = _cfg()
    free = calibrate.candidates(cfg.eval, cfg.teacher, 8)
    assert {c["threads"] for c in free} == {1, 4, 8} and {c["attn_implementation"] for c in free} == {"sdpa", "eager"}
    assert {c["dtype"] for c in free} == {"float32"}
    fixed = _cfg("eval.threads=3", "teacher.attn_implementation=eager", "teacher.dtype=bfloat16")
    assert calibrate.candidates(fixed.eval, fixed.teacher, 8) == [
        {"threads": 3, "attn_implementation": "eager", "dtype": "bfloat16"}]
    both = _cfg("eval.cpu_dtypes=[float32,bfloat16]")
    assert {c["dtype"] for c in calibrate.candidates(both.eval, both.teacher, 2)} == {"float32", "bfloat16"}


def test_calibration_picks_a_timed_candidate_applies_it_and_caches_it(tiny_teacher, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    folder, model, _ = tiny_teacher
    cfg = _cfg("eval.calibration_tokens=16")
    threads = torch.get_num_threads()
    try:
        first = calibrate.calibrate(model, folder, cfg.teacher, cfg.eval, "fp-1")
        todo = calibrate.candidates(cfg.eval, cfg.teacher, calibrate.TORCH_THREADS)
        assert not first["cached"] and len(first["timings"]) == len(todo)
        best = min(first["timings"], key=first["timings"].get)
        assert best == calibrate._name(first)  # "2 threads, sdpa, float32"; "1 thread, ..."
        assert best.startswith(f"{first['threads']} thread")
        assert torch.get_num_threads() == first["threads"]
        assert model.config._attn_implementation == first["attn_implementation"]
        again = calibrate.calibrate(model, folder, cfg.teacher, cfg.eval, "fp-1")
        assert again["cached"] and {k: again[k] for k in ("threads", "attn_implementation", "dtype")} == \
            {k: first[k] for k in ("threads", "attn_implementation", "dtype")}
        assert not calibrate.calibrate(model, folder, cfg.teacher, cfg.eval, "fp-2")["cached"]  # another model
    finally:
        torch.set_num_threads(threads)
        model.set_attn_implementation("sdpa")


def test_a_record_reports_the_settings_it_was_measured_with(tiny_cfg, monkeypatch, tmp_path):
    from compress.data import load_splits
    from compress.measure import evaluate_folder
    from teachers import loading

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    folder = loading.resolve(tiny_cfg.teacher, "teacher")
    splits = load_splits(tiny_cfg.data)
    cfg = OmegaConf.merge(tiny_cfg, {"eval": {"cpu_dtypes": ["bfloat16"], "accuracy": False, "latency": False,
                                              "calibration_tokens": 16}})
    measured = evaluate_folder(folder, cfg.teacher, "teacher", splits, cfg)
    assert measured["dtype"] == "bfloat16" and measured["attn_implementation"] in ("sdpa", "eager")
    assert measured["threads"] in calibrate.thread_candidates(threads)
    assert torch.get_num_threads() == threads  # restored for whatever runs next
    off = OmegaConf.merge(cfg, {"eval": {"calibrate": False, "threads": 1}})
    measured = evaluate_folder(folder, off.teacher, "teacher", splits, off)
    assert (measured["threads"], measured["dtype"]) == (1, "float32")


def test_softcapped_attention_is_only_timed_eager():
    cfg = _cfg()
    assert {c["attn_implementation"] for c in calibrate.candidates(cfg.eval, cfg.teacher, 2, softcapped=True)} == \
        {"eager"}


def test_another_dtype_is_timed_on_a_copy(tiny_teacher, monkeypatch, tmp_path):
    """bf16 candidates never round the fp32 weights of the model that is then measured."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    folder, model, _ = tiny_teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg("eval.cpu_dtypes=[float32,bfloat16]", "eval.calibration_tokens=16")
    threads = torch.get_num_threads()
    try:
        choice = calibrate.calibrate(model, folder, cfg.teacher, cfg.eval, "fp-copy")
        assert len(choice["timings"]) == 2 * len(calibrate.thread_candidates(calibrate.TORCH_THREADS)) * 2
        if choice["dtype"] == "float32":
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        else:
            assert next(model.parameters()).dtype == torch.bfloat16
    finally:
        model.to(torch.float32).load_state_dict(before)
        torch.set_num_threads(threads)
        model.set_attn_implementation("sdpa")
