"""Quantization-aware distillation (`distill.quant_aware_steps`): the rounding against onnxruntime's own
int4 quantizer, the straight-through gradient, a checkpoint taken while rounding, and a run whose int4
export holds exactly the weights the student was saved with."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY, cli
from students import quant_aware


def ort_int4(w: np.ndarray, block: int) -> np.ndarray:
    """`w` (N, K) as onnxruntime's MatMulNBits quantizer (4 bits, symmetric) stores W^T, read back: (N, K)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = w.shape
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    zero = np.zeros((n, (blocks + 1) // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T), scales, zero, block, n, k, True)
    q = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, block).astype(np.float32)  # (N, K/B, B)
    return ((q - 8) * scales[..., None]).reshape(n, -1)[:, :k]


@pytest.mark.parametrize("k, block", [(64, 32), (96, 32), (80, 32), (128, 64)])
def test_rounding_equals_onnxruntimes_int4_quantizer(k, block):
    """Blocks along the input, the last one zero-padded when K is not a multiple; one all-zero block.
    Exact: the same fp32 products."""
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(k))
    w[2, :block] = 0
    ours = quant_aware.round_int4(w, block).numpy()
    np.testing.assert_array_equal(ours, ort_int4(w.numpy(), block))
    assert np.all(ours[2, :block] == 0)


def test_rounding_is_idempotent_so_the_export_keeps_the_saved_weights():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    once = quant_aware.round_int4(w, 32)
    assert torch.equal(quant_aware.round_int4(once, 32), once)
    assert once.unique().numel() < w.numel()  # it did round


def test_gradient_passes_straight_through():
    """Forward with the rounded weight; d loss / d weight as if the rounded weight were the weight (float64)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=False).double()
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", quant_aware.RoundInt4(32))
    y = lin(x)
    rounded = quant_aware.round_int4(lin.parametrizations.weight.original.detach(), 32)
    torch.testing.assert_close(y, x @ rounded.T)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, g.T @ x)


def _rounded(w: torch.Tensor) -> bool:
    return torch.equal(quant_aware.round_int4(w.detach(), 32), w.detach())


def test_attach_rounds_the_decoder_and_the_head_and_bake_keeps_the_rounded_values(tiny_teacher, tiny_cfg):
    from teachers import loading

    folder, _, _ = tiny_teacher
    model, _ = loading.load(folder, tiny_cfg.teacher, "teacher")  # an untied head that trains
    embed = model.get_input_embeddings().weight.detach().clone()
    before = {id(p) for p in model.parameters()}
    n = quant_aware.attach(model, 32)
    assert n == len(quant_aware.linears(model)) + 1 and quant_aware.attached(model)
    assert {id(p) for p in model.parameters()} == before  # an optimizer built before still holds them
    assert quant_aware.bake(model) == n and not quant_aware.attached(model)
    assert all(_rounded(lin.weight) for lin in quant_aware.linears(model))
    assert _rounded(model.get_output_embeddings().weight)
    assert torch.equal(model.get_input_embeddings().weight, embed)


def test_a_frozen_tied_head_is_rounded_in_place_with_the_embeddings(tiny_teacher, tiny_cfg):
    from teachers import loading

    folder, _, _ = tiny_teacher
    model, _ = loading.load(folder, tiny_cfg.teacher, "teacher")
    model.get_output_embeddings().weight = model.get_input_embeddings().weight  # tied, as SmolLM2's
    model.get_input_embeddings().weight.requires_grad_(False)  # distill.freeze_embeddings=true
    assert quant_aware.attach(model, 32) == len(quant_aware.linears(model)) + 1
    assert _rounded(model.get_input_embeddings().weight) and _rounded(model.get_output_embeddings().weight)
    assert quant_aware.bake(model) == len(quant_aware.linears(model))


def test_a_checkpoint_taken_while_rounding_loads_into_a_fresh_module(tiny_teacher, tiny_cfg):
    from students.distill import DistillModule
    from teachers import loading

    folder, _, _ = tiny_teacher
    d = tiny_cfg.distill.copy()
    d.quant_aware_steps, d.hidden_weight = 2, 0.0
    a = DistillModule(loading.load(folder, tiny_cfg.teacher, "teacher")[0], None, d)
    quant_aware.attach(a.student, d.quant_aware_block_size)
    state = {"state_dict": a.state_dict()}
    b = DistillModule(loading.load(folder, tiny_cfg.teacher, "teacher")[0], None, d)
    b.on_load_checkpoint(state)
    b.load_state_dict(state["state_dict"], strict=True)
    assert quant_aware.attached(b.student)
    assert b.quant_aware(d.max_steps - 2) and not b.quant_aware(d.max_steps - 3)


def test_a_quant_aware_run_exports_int4_weights_equal_to_the_saved_student(tmp_path):
    """With the int4 kernel computing in fp32 (accuracy level 0), the int4 graph of a student saved
    rounded computes what its fp32 graph does: every weight it quantizes, the head too, is the same number."""
    proc = cli("run", *TINY, "pipeline=distill_export", "distill=quick", "distill.quant_aware_steps=2",
               "export.variants=[fp32,int4]", "export.int4_accuracy_level=0", "export.int4_exclude=[]",
               f"run.root={tmp_path}", "run.name=Q")
    assert proc.returncode == 0, proc.stderr
    assert "last 2 steps trained through int4 weights" in proc.stdout + proc.stderr
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "Q" / "01_distill" / "model" / "model.safetensors")
    linear = [v for k, v in weights.items() if (".layers." in k and k.endswith("proj.weight")) or "lm_head" in k]
    assert len(linear) > 7 and all(_rounded(w) for w in linear)
    parity = json.loads((tmp_path / "Q" / "02_export" / "parity.json").read_text())
    assert parity["int4"]["top1"] == 1.0
    assert parity["int4"]["max_abs_diff"] < 10 * parity["fp32"]["max_abs_diff"] + 1e-4, parity
