"""students.losses against plain float64 references written with loops, plus their properties."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from students import losses

B, T, V = 2, 5, 11
TEMPS = [1.0, 2.0, 0.5]


def make(seed: int = 0, scale: float = 3.0, dtype=torch.float32):
    """Student logits, teacher logits (B, T, V) and a mask (B, T) with a masked tail in each row."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    t = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 4:] = False
    return s, t, mask


def rows(mask):
    return [(b, i) for b in range(mask.shape[0]) for i in range(mask.shape[1]) if mask[b, i]]


def ref_forward_kl(s, t, mask, temp):
    """torch kl_div on each unmasked row, float64."""
    vals = []
    for b, i in rows(mask):
        log_q = torch.log_softmax(s[b, i].double() / temp, -1)
        p = torch.softmax(t[b, i].double() / temp, -1)
        vals.append(F.kl_div(log_q, p, reduction="sum"))
    return torch.stack(vals).mean() * temp**2


def ref_reverse_kl(s, t, mask, temp):
    """Explicit sum over the vocabulary, float64."""
    total = 0.0
    for b, i in rows(mask):
        q = torch.softmax(s[b, i].double() / temp, -1)
        p = torch.softmax(t[b, i].double() / temp, -1)
        total += sum(float(q[v]) * math.log(float(q[v]) / float(p[v])) for v in range(s.shape[-1]))
    return total / len(rows(mask)) * temp**2


def ref_jsd(s, t, mask, beta, temp):
    """Mixture in probability space (not log space), explicit loops, float64."""
    total = 0.0
    for b, i in rows(mask):
        q = torch.softmax(s[b, i].double() / temp, -1).tolist()
        p = torch.softmax(t[b, i].double() / temp, -1).tolist()
        m = [beta * pv + (1 - beta) * qv for pv, qv in zip(p, q)]
        kl_pm = sum(pv * math.log(pv / mv) for pv, mv in zip(p, m))
        kl_qm = sum(qv * math.log(qv / mv) for qv, mv in zip(q, m))
        total += beta * kl_pm + (1 - beta) * kl_qm
    return total / len(rows(mask)) * temp**2


def ref_topk(s, lp, idx, tail, mask, temp):
    """K + 1 buckets built by hand from student probabilities, float64."""
    total = 0.0
    for b, i in rows(mask):
        q = torch.softmax(s[b, i].double() / temp, -1)
        ids = idx[b, i].long().tolist()
        q_b = [float(q[v]) for v in ids] + [1.0 - sum(float(q[v]) for v in ids)]
        p_b = [math.exp(x) for x in lp[b, i].double().tolist()] + [math.exp(float(tail[b, i]))]
        total += sum(pb * math.log(pb / qb) for pb, qb in zip(p_b, q_b) if pb > 0)
    return total / len(rows(mask)) * temp**2


def ref_ce(z, y, mask):
    vals = [-torch.log_softmax(z[b, i].double(), -1)[y[b, i]] for b, i in rows(mask)]
    return torch.stack(vals).mean()


def cache(t, k, temp):
    """A top-K cache in float32 (exact), from float64 teacher probabilities."""
    log_p = torch.log_softmax(t.double() / temp, -1)
    lp, idx = log_p.topk(k, -1)
    rest = 1 - lp.exp().sum(-1)
    tail = torch.where(rest > 1e-12, rest.clamp_min(1e-300).log(), torch.tensor(-math.inf, dtype=torch.float64))
    return lp.float(), idx, tail.float()


# ---------------------------------------------------------------------------------------------
# Agreement with the references


@pytest.mark.parametrize("temp", TEMPS)
def test_forward_kl_matches_reference(temp):
    s, t, mask = make(1)
    out = losses.forward_kl(s, t, mask, temperature=temp)
    assert out.dim() == 0 and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_forward_kl(s, t, mask, temp), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temp", TEMPS)
def test_reverse_kl_matches_reference(temp):
    s, t, mask = make(2)
    out = losses.reverse_kl(s, t, mask, temperature=temp)
    assert out.dim() == 0 and out.dtype == torch.float32
    assert out.item() == pytest.approx(ref_reverse_kl(s, t, mask, temp), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temp", TEMPS)
def test_jsd_matches_reference(beta, temp):
    s, t, mask = make(3)
    out = losses.generalized_jsd(s, t, mask, beta=beta, temperature=temp)
    assert out.dim() == 0 and out.dtype == torch.float32
    assert out.item() == pytest.approx(ref_jsd(s, t, mask, beta, temp), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("k", [1, 3, V - 1])
@pytest.mark.parametrize("temp", TEMPS)
def test_topk_forward_kl_matches_reference(k, temp):
    s, t, mask = make(4)
    lp, idx, tail = cache(t, k, temp)
    out = losses.topk_forward_kl(s, lp, idx, tail, mask, temperature=temp)
    assert out.dim() == 0 and out.dtype == torch.float32
    assert out.item() == pytest.approx(ref_topk(s, lp, idx, tail, mask, temp), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("temp", TEMPS)
def test_teacher_topk_matches_reference(temp):
    _, t, _ = make(5)
    k = 4
    lp, idx, tail = losses.teacher_topk(t, k, temperature=temp)
    assert lp.shape == idx.shape == (B, T, k) and tail.shape == (B, T)
    assert (lp.dtype, idx.dtype, tail.dtype) == (torch.float16, torch.int32, torch.float32)
    for b in range(B):
        for i in range(T):
            log_p = torch.log_softmax(t[b, i].double() / temp, -1)
            order = sorted(range(V), key=lambda v: -float(log_p[v]))[:k]
            assert idx[b, i].tolist() == order
            torch.testing.assert_close(lp[b, i].double(), log_p[order], rtol=2e-3, atol=2e-3)
            rest = sum(math.exp(float(log_p[v])) for v in range(V) if v not in order)
            assert float(tail[b, i]) == pytest.approx(math.log(rest), rel=1e-5, abs=1e-5)


def test_teacher_topk_full_vocab_has_no_tail():
    _, t, _ = make(6)
    _, idx, tail = losses.teacher_topk(t, V)
    assert torch.isneginf(tail).all()
    assert (idx.sort(-1).values == torch.arange(V, dtype=torch.int32)).all()


def test_teacher_topk_rejects_bad_k():
    _, t, _ = make(6)
    for k in (0, V + 1):
        with pytest.raises(ValueError, match="k"):
            losses.teacher_topk(t, k)


def test_cross_entropy_matches_reference():
    s, _, mask = make(7)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    y[~mask] = -100  # never read: masked positions
    out = losses.cross_entropy(s, y, mask)
    assert out.dim() == 0 and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_ce(s, y, mask), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("fn", [losses.forward_kl, losses.reverse_kl, losses.generalized_jsd])
@pytest.mark.parametrize("temp", TEMPS)
def test_zero_for_identical_logits(fn, temp):
    s, _, mask = make(8)
    assert fn(s, s.clone(), mask, temperature=temp).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temp", TEMPS)
def test_jsd_symmetric_at_half(temp):
    s, t, mask = make(9)
    a = losses.generalized_jsd(s, t, mask, beta=0.5, temperature=temp)
    b = losses.generalized_jsd(t, s, mask, beta=0.5, temperature=temp)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_jsd_not_symmetric_away_from_half():
    s, t, mask = make(9)
    a = losses.generalized_jsd(s, t, mask, beta=0.2)
    b = losses.generalized_jsd(t, s, mask, beta=0.2)
    assert abs(a.item() - b.item()) > 1e-4


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_jsd_bounded_by_log2(scale):
    s, t, mask = make(10, scale=scale)
    out = losses.generalized_jsd(s, t, mask, beta=0.5, temperature=1.0).item()
    assert 0 <= out <= math.log(2) + 1e-6
    for temp in (2.0, 0.5):
        assert losses.generalized_jsd(s, t, mask, temperature=temp).item() <= math.log(2) * temp**2 + 1e-6


def test_jsd_reaches_log2_for_disjoint_supports():
    s = torch.full((1, 1, 4), -1e4)
    t = s.clone()
    s[..., 0] = 1e4
    t[..., 1] = 1e4
    out = losses.generalized_jsd(s, t, torch.ones(1, 1, dtype=torch.bool), beta=0.5)
    assert out.item() == pytest.approx(math.log(2), rel=1e-5)


def test_kl_nonnegative():
    for seed in range(5):
        s, t, mask = make(seed)
        assert losses.forward_kl(s, t, mask).item() >= 0
        assert losses.reverse_kl(s, t, mask).item() >= 0


def _all_losses(s, t, mask, temp=1.0):
    """Every loss on the same inputs: {name: scalar}."""
    lp, idx, tail = losses.teacher_topk(t, 4, temperature=temp)
    y = t.argmax(-1)
    return {
        "forward_kl": losses.forward_kl(s, t, mask, temperature=temp),
        "reverse_kl": losses.reverse_kl(s, t, mask, temperature=temp),
        "jsd": losses.generalized_jsd(s, t, mask, beta=0.3, temperature=temp),
        "topk": losses.topk_forward_kl(s, lp, idx, tail, mask, temperature=temp),
        "ce": losses.cross_entropy(s, y, mask),
    }


@pytest.mark.parametrize("garbage", [1e4, math.inf, math.nan])
def test_masked_positions_do_not_matter(garbage):
    s, t, mask = make(11)
    clean = _all_losses(s, t, mask, temp=2.0)
    s2, t2 = s.clone(), t.clone()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(B, T, V, generator=g) * 50
    s2[~mask] = noise[~mask]
    t2[~mask] = -noise[~mask]
    if garbage != 1e4:
        s2[~mask, 0] = garbage
        t2[~mask, 1] = garbage
    s2.requires_grad_(True)
    dirty = _all_losses(s2, t2, mask, temp=2.0)
    for name in clean:
        torch.testing.assert_close(dirty[name], clean[name], msg=name)
        s2.grad = None
        dirty[name].backward(retain_graph=True)
        assert torch.isfinite(s2.grad).all(), name
        assert (s2.grad[~mask] == 0).all(), name


def test_integer_mask_equals_bool_mask():
    s, t, mask = make(12)
    a = _all_losses(s, t, mask)
    b = _all_losses(s, t, mask.long())
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_gradient_reaches_student_only():
    s, t, mask = make(13)
    s.requires_grad_(True)
    t.requires_grad_(True)
    lp, idx, tail = losses.teacher_topk(t, 4)
    assert not lp.requires_grad and not tail.requires_grad
    lp.requires_grad_(True)
    tail.requires_grad_(True)
    outs = {
        "forward_kl": losses.forward_kl(s, t, mask, temperature=2.0),
        "reverse_kl": losses.reverse_kl(s, t, mask, temperature=2.0),
        "jsd": losses.generalized_jsd(s, t, mask, temperature=2.0),
        "topk": losses.topk_forward_kl(s, lp, idx, tail, mask),
    }
    for name, out in outs.items():
        s.grad = None
        out.backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, name
        assert t.grad is None and lp.grad is None and tail.grad is None, name


def test_gradient_matches_float64_autograd():
    s, t, mask = make(14)
    s32 = s.clone().requires_grad_(True)
    losses.forward_kl(s32, t, mask, temperature=2.0).backward()
    s64 = s.double().requires_grad_(True)
    ref_forward_kl(s64, t, mask, 2.0).backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32(dtype):
    s, t, mask = make(15, dtype=dtype)
    s.requires_grad_(True)
    low = _all_losses(s, t, mask, temp=2.0)
    full = _all_losses(s.detach().float(), t.float(), mask, temp=2.0)
    for name in low:
        assert low[name].dtype == torch.float32, name
        torch.testing.assert_close(low[name], full[name], rtol=1e-5, atol=1e-5, msg=name)
        s.grad = None
        low[name].backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all(), name


@pytest.mark.parametrize("temp", TEMPS)
def test_topk_full_vocab_equals_forward_kl(temp):
    s, t, mask = make(16)
    expected = losses.forward_kl(s, t, mask, temperature=temp)
    # exact float32 cache: tail = -inf
    lp, idx, tail = cache(t, V, temp)
    assert torch.isneginf(tail).all()
    s_ = s.clone().requires_grad_(True)
    out = losses.topk_forward_kl(s_, lp, idx.int(), tail, mask, temperature=temp)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.backward()
    assert torch.isfinite(s_.grad).all()
    # the float16 cache teacher_topk builds
    lp16, idx32, tail32 = losses.teacher_topk(t, V, temperature=temp)
    out16 = losses.topk_forward_kl(s, lp16, idx32, tail32, mask, temperature=temp)
    torch.testing.assert_close(out16, expected, rtol=5e-3, atol=5e-3)


def test_topk_full_vocab_gradient_equals_forward_kl():
    s, t, mask = make(17)
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    losses.forward_kl(a, t, mask).backward()
    lp, idx, tail = cache(t, V, 1.0)
    losses.topk_forward_kl(b, lp, idx, tail, mask).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_topk_small_k_close_for_peaked_teacher(temp):
    s, _, mask = make(18, scale=1.0)
    t = torch.randn(B, T, V, generator=torch.Generator().manual_seed(18))
    t[..., 3] += 40.0  # nearly all teacher mass on one token
    t[..., 7] += 38.0
    expected = losses.forward_kl(s, t, mask, temperature=temp)
    lp, idx, tail = losses.teacher_topk(t, 2, temperature=temp)
    out = losses.topk_forward_kl(s, lp, idx, tail, mask, temperature=temp)
    assert out.item() == pytest.approx(expected.item(), rel=1e-2, abs=1e-3)
    # and the bucketed KL never exceeds the full one (data processing inequality)
    assert out.item() <= expected.item() + 1e-4


def test_bucketed_kl_not_above_full_kl_in_general():
    s, t, mask = make(19)
    full = losses.forward_kl(s, t, mask).item()
    for k in (1, 3, 6):
        lp, idx, tail = cache(t, k, 1.0)
        assert losses.topk_forward_kl(s, lp, idx, tail, mask).item() <= full + 1e-5


def _finite_with_finite_grad(fn, s, t, mask):
    s = s.clone().requires_grad_(True)
    out = fn(s, t, mask)
    out.backward()
    return torch.isfinite(out).item() and torch.isfinite(s.grad).all().item()


def test_neg_inf_logits_give_no_nan():
    s, t, mask = make(20)
    t_ban, s_ban = t.clone(), s.clone()
    t_ban[..., 0] = -math.inf  # the teacher bans a token: 0 log 0 terms
    s_ban[..., 1] = -math.inf  # the student bans another
    lp, idx, tail = cache(t_ban, V, 1.0)
    topk = lambda s_, t_, m_: losses.topk_forward_kl(s_, lp, idx, tail, m_)
    assert _finite_with_finite_grad(losses.forward_kl, s, t_ban, mask)
    assert _finite_with_finite_grad(topk, s, t_ban, mask)
    assert _finite_with_finite_grad(losses.reverse_kl, s_ban, t, mask)
    # both sides ban the same token: every loss finite, no NaN in the gradient
    s_same = s.clone()
    s_same[..., 0] = -math.inf
    for fn in (losses.forward_kl, losses.reverse_kl, losses.generalized_jsd):
        assert _finite_with_finite_grad(fn, s_same, t_ban, mask), fn.__name__
    # JSD stays finite even when the supports differ
    assert _finite_with_finite_grad(losses.generalized_jsd, s_ban, t_ban, mask)
    # support mismatch gives +inf, never NaN
    assert torch.isposinf(losses.forward_kl(s_ban, t, mask))
    assert torch.isposinf(losses.reverse_kl(s, t_ban, mask))


@pytest.mark.parametrize("temp", [0.0, -1.0, math.nan])
def test_non_positive_temperature_raises(temp):
    s, t, mask = make(21)
    lp, idx, tail = losses.teacher_topk(t, 3)
    calls = [
        lambda: losses.forward_kl(s, t, mask, temperature=temp),
        lambda: losses.reverse_kl(s, t, mask, temperature=temp),
        lambda: losses.generalized_jsd(s, t, mask, temperature=temp),
        lambda: losses.topk_forward_kl(s, lp, idx, tail, mask, temperature=temp),
        lambda: losses.teacher_topk(t, 3, temperature=temp),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"temperature.*" + ("nan" if math.isnan(temp) else str(temp))):
            call()


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_jsd_beta_out_of_range_raises(beta):
    s, t, mask = make(22)
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(s, t, mask, beta=beta)


def test_shape_mismatch_raises():
    s, t, mask = make(23)
    with pytest.raises(ValueError):
        losses.forward_kl(s, t[..., :-1], mask)
    with pytest.raises(ValueError):
        losses.forward_kl(s, t, mask[:, :-1])
    with pytest.raises(ValueError):
        losses.cross_entropy(s, t.argmax(-1)[:, :-1], mask)


def test_all_masked_returns_zero_with_grad_fn():
    s, t, mask = make(24)
    s.requires_grad_(True)
    none = torch.zeros_like(mask)
    for name, out in _all_losses(s, t, none).items():
        assert out.item() == 0.0, name
        assert out.grad_fn is not None, name
        s.grad = None
        out.backward()
        assert (s.grad == 0).all(), name


def test_hidden_cosine_matches_reference_and_properties():
    g = torch.Generator().manual_seed(31)
    s = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(3)]  # 3 layers of (B, T, H)
    t = [torch.randn(2, 5, 8, generator=g) * 10 for _ in range(3)]
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    ref = sum(sum(1 - torch.dot(a[b, i].double(), c[b, i].double()) / (a[b, i].double().norm() * c[b, i].double().norm())
                  for b, i in mask.nonzero().tolist()) / int(mask.sum()) for a, c in zip(s, t)) / 3
    out = losses.hidden_cosine(s, t, mask)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-6)
    assert losses.hidden_cosine(t, [x * 3 for x in t], mask).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert losses.hidden_cosine(t, [-x for x in t], mask).item() == pytest.approx(2.0, abs=1e-6)
    tt = [x.clone().requires_grad_(True) for x in t]
    losses.hidden_cosine(s, tt, mask).backward()
    assert all(x.grad is None for x in tt) and all(x.grad is not None for x in s)  # only the student learns
    with pytest.raises(ValueError):
        losses.hidden_cosine(s, t[:2], mask)
