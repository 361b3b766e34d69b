"""Distillation losses: plain functions from logits to a scalar loss.

Conventions shared by every function here:

* Logits are (B, T, V): batch, sequence positions, vocabulary. Positions are already
  aligned (the caller shifts targets / teacher outputs); nothing here shifts.
* `mask` is (B, T), bool or 0/1; True (1) marks a token that counts. Only the unmasked
  rows are gathered before any arithmetic, so masked positions may hold anything
  (padding, garbage, even inf/NaN) without touching the value or the gradient.
* The result is the mean over unmasked tokens, a float32 scalar. With no unmasked
  token it is a 0.0 that still carries a grad_fn back to the student logits (the sum
  of an empty selection), so `loss.backward()` always works.
* Softmax / log_softmax run in float32: inputs are cast with `.float()` first, so
  fp16 / bf16 logits give a float32 loss.
* Distribution losses take a `temperature` T > 0: both distributions are softened as
  softmax(z / T) and the divergence is multiplied by T**2 (Hinton et al. 2015), which
  keeps gradient magnitudes comparable across temperatures.
* Teacher tensors are constants: they are detached, and only the student gets a grad.
* 0 * log 0 is taken as 0, so -inf logits / log-probabilities give no NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "topk_forward_kl", "teacher_topk", "cross_entropy",
           "hidden_cosine"]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got temperature={temperature!r}")


def _rows(mask: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor (B, T, ...) reduced to its unmasked rows (N, ...), N = mask.sum()."""
    mask = mask.bool()  # (B, T)
    for x in tensors:
        if x.shape[:2] != mask.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but a tensor has shape {tuple(x.shape)}; "
                             f"expected (B, T) and (B, T, ...)")
    return [x[mask] for x in tensors]


def _mean(per_token: torch.Tensor) -> torch.Tensor:
    """Mean of (N,) per-token losses; 0.0 with grad_fn when N == 0 (the sum of an empty tensor)."""
    return per_token.sum() / max(per_token.numel(), 1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last dim, with 0 log 0 = 0.

    (N, V), (N, V) -> (N,). Entries with a_v = 0 contribute exactly 0 to the value and the
    gradient (no NaN from -inf - -inf or 0 * inf).
    """
    a = log_a.exp()  # (N, V)
    diff = torch.where(a > 0, log_a - log_b, 0.0)  # (N, V)
    return (a * diff).sum(-1)  # (N,)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / T) in float32. (N, V) -> (N, V)"""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _check_same_shape(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same (B, T, V) shape")


def _softened(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs -> (log q_S, log p_T) at temperature T over the unmasked rows: (N, V) each."""
    _check_temperature(temperature)
    _check_same_shape(student_logits, teacher_logits)
    s, t = _rows(mask, student_logits, teacher_logits.detach())  # (N, V)
    return _log_probs(s, temperature), _log_probs(t, temperature)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Forward KL, KL(p_T || q_S) * T**2, averaged over unmasked tokens.

        p = softmax(teacher / T),  q = softmax(student / T)
        loss_t = T**2 * sum_v p_v (log p_v - log q_v)

    Mode-covering: the student is pushed to put mass wherever the teacher does.

    Args:
        student_logits: (B, T, V), any float dtype.
        teacher_logits: (B, T, V), detached (no grad flows to the teacher).
        mask: (B, T) bool / 0-1, True = token counts.
        temperature: T > 0.
    Returns:
        float32 scalar.
    """
    log_q, log_p = _softened(student_logits, teacher_logits, mask, temperature)  # (N, V)
    return _mean(_kl(log_p, log_q)) * temperature**2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL, KL(q_S || p_T) * T**2, averaged over unmasked tokens.

        p = softmax(teacher / T),  q = softmax(student / T)
        loss_t = T**2 * sum_v q_v (log q_v - log p_v)

    Mode-seeking: the student is pushed to put mass only where the teacher does.

    Args:
        student_logits: (B, T, V), any float dtype.
        teacher_logits: (B, T, V), detached.
        mask: (B, T) bool / 0-1, True = token counts.
        temperature: T > 0.
    Returns:
        float32 scalar.
    """
    log_q, log_p = _softened(student_logits, teacher_logits, mask, temperature)  # (N, V)
    return _mean(_kl(log_q, log_p)) * temperature**2


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), times T**2.

        p = softmax(teacher / T),  q = softmax(student / T)
        m = beta * p + (1 - beta) * q
        loss_t = T**2 * (beta * KL(p || m) + (1 - beta) * KL(q || m))

    log m = logsumexp([log p + log beta, log q + log(1 - beta)]) is computed in log space.
    Bounded by H(beta) = -beta log beta - (1-beta) log(1-beta) (log 2 at beta = 0.5, where it
    is symmetric in student and teacher); small beta behaves like forward KL, beta near 1
    like reverse KL (each scaled by beta resp. 1 - beta).

    Args:
        student_logits: (B, T, V), any float dtype.
        teacher_logits: (B, T, V), detached.
        mask: (B, T) bool / 0-1, True = token counts.
        beta: mixture weight of the teacher, in the open interval (0, 1).
        temperature: T > 0.
    Returns:
        float32 scalar.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in the open interval (0, 1), got beta={beta!r}")
    log_q, log_p = _softened(student_logits, teacher_logits, mask, temperature)  # (N, V)
    mix = torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)])  # (2, N, V)
    # where p = q = 0, logsumexp(-inf, -inf) has a NaN gradient: use a finite placeholder
    # there instead (never read, as _kl skips entries with zero mass).
    mix = mix.masked_fill(torch.isneginf(log_p) & torch.isneginf(log_q), 0.0)
    log_m = torch.logsumexp(mix, dim=0)  # (N, V)
    jsd = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)  # (N,)
    return _mean(jsd) * temperature**2


def _tail_logsumexp(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the mass outside `indices`: logsumexp over the entries not in the top K.

    (N, V), (N, K) int64 -> (N,). -inf where the top K covers every entry with mass; the
    gradient stays finite there too (those rows go through a dummy logsumexp of zeros).
    """
    in_topk = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, indices, True)  # (N, V)
    rest = log_probs.masked_fill(in_topk, -math.inf)  # (N, V)
    has_tail = (rest > -math.inf).any(-1, keepdim=True)  # (N, 1)
    lse = torch.logsumexp(torch.where(has_tail, rest, 0.0), dim=-1)  # (N,)
    return torch.where(has_tail.squeeze(-1), lse, -math.inf)  # (N,)


def topk_forward_kl(student_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor,
                    tail_logprob: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL against a cached top-K teacher, over K + 1 buckets, times T**2.

    The teacher is stored as log p at its top-K tokens plus log of the remaining mass
    (see `teacher_topk`), already at temperature T. The student q = softmax(student / T)
    is reduced to the same buckets:

        q_k    = q[topk_indices[k]]            k = 1..K
        q_tail = sum_{v not in top K} q_v      (exact logsumexp over the other entries)
        loss_t = T**2 * sum_{b in K+1 buckets} p_b (log p_b - log q_b)

    With K = V and tail_logprob = -inf this equals `forward_kl` (0 log 0 = 0, no NaN).

    Args:
        student_logits: (B, T, V), any float dtype.
        topk_logprobs: (B, T, K) float16 / float32, teacher log-probs at temperature T.
        topk_indices: (B, T, K) int32 / int64 vocabulary ids, distinct within a row.
        tail_logprob: (B, T) log(1 - sum of the top-K teacher probs); -inf for no tail.
        mask: (B, T) bool / 0-1, True = token counts.
        temperature: T > 0, the one the cache was built with.
    Returns:
        float32 scalar.
    """
    _check_temperature(temperature)
    if topk_logprobs.shape != topk_indices.shape or topk_logprobs.shape[:2] != tail_logprob.shape:
        raise ValueError(f"topk_logprobs {tuple(topk_logprobs.shape)}, topk_indices {tuple(topk_indices.shape)} "
                         f"and tail_logprob {tuple(tail_logprob.shape)} must be (B, T, K), (B, T, K), (B, T)")
    s, lp, idx, tail = _rows(mask, student_logits, topk_logprobs.detach(), topk_indices, tail_logprob.detach())
    idx = idx.long()  # (N, K)
    log_q = _log_probs(s, temperature)  # (N, V)
    log_q_b = torch.cat([log_q.gather(-1, idx), _tail_logsumexp(log_q, idx)[:, None]], dim=-1)  # (N, K+1)
    log_p_b = torch.cat([lp.float(), tail.float()[:, None]], dim=-1)  # (N, K+1)
    return _mean(_kl(log_p_b, log_q_b)) * temperature**2


@torch.no_grad()
def teacher_topk(teacher_logits: torch.Tensor, k: int,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress full teacher logits into the top-K cache `topk_forward_kl` reads.

        log p = log_softmax(teacher / T)                  (float32)
        topk_logprobs, topk_indices = top-K of log p      (sorted, largest first)
        tail_logprob = logsumexp of log p outside top K   (-inf when K = V)

    Args:
        teacher_logits: (B, T, V), any float dtype.
        k: 1 <= k <= V.
        temperature: T > 0, the one the student loss will use.
    Returns:
        topk_logprobs (B, T, K) float16, topk_indices (B, T, K) int32, tail_logprob (B, T) float32.
    """
    _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got k={k!r}")
    log_p = _log_probs(teacher_logits.detach(), temperature)  # (B, T, V)
    values, indices = log_p.topk(k, dim=-1)  # (B, T, K)
    flat = log_p.reshape(-1, vocab)  # (B*T, V)
    tail = _tail_logsumexp(flat, indices.reshape(-1, k)).reshape(log_p.shape[:-1])  # (B, T)
    return values.half(), indices.int(), tail


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy, averaged over unmasked tokens.

        loss_t = -log softmax(logits_t)[targets_t]

    One function for both uses: pseudo-labels (teacher-generated tokens, sequence-level KD)
    and hard labels (ground-truth tokens). `targets` are aligned with the logits positions
    (the caller shifts); their values at masked positions are never read (e.g. -100 is fine).

    Args:
        logits: (B, T, V), any float dtype.
        targets: (B, T) integer token ids.
        mask: (B, T) bool / 0-1, True = token counts.
    Returns:
        float32 scalar.
    """
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets {tuple(targets.shape)} must be (B, T) for logits {tuple(logits.shape)}")
    z, y = _rows(mask, logits, targets)  # (N, V), (N,)
    return _mean(F.cross_entropy(z.float(), y.long(), reduction="none"))  # (N,) -> ()


def hidden_cosine(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                  mask: torch.Tensor) -> torch.Tensor:
    """Intermediate-layer distillation: 1 - cosine similarity of paired hidden states.

        loss = mean over pairs l and unmasked tokens t of  1 - <s_lt, h_lt> / (|s_lt| |h_lt|)

    Each student layer is paired with the teacher layer whose output it replaces (the
    caller chooses the pairs). Cosine ignores the scale of the residual stream, which
    grows with depth, so every pair weighs the same. Computed in float32.

    Args:
        student_hidden: L tensors (B, T, H), the student's hidden states.
        teacher_hidden: L tensors (B, T, H), the paired teacher hidden states (constants).
        mask: (B, T) bool / 0-1, True = token counts.
    Returns:
        float32 scalar in [0, 2].
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"need the same number (>= 1) of student and teacher hidden states, got "
                         f"{len(student_hidden)} and {len(teacher_hidden)}")
    per_layer = []
    for s, t in zip(student_hidden, teacher_hidden):
        if s.shape != t.shape:
            raise ValueError(f"paired hidden states differ in shape: student {tuple(s.shape)}, "
                             f"teacher {tuple(t.shape)}")
        s, t = _rows(mask, s, t.detach())  # (N, H)
        per_layer.append(_mean(1 - F.cosine_similarity(s.float(), t.float(), dim=-1)))  # (N,) -> ()
    return torch.stack(per_layer).mean()
