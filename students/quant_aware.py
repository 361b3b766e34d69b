"""Quantization-aware distillation: the student trains through the weights its int4 export will hold.

`attach` puts a straight-through rounding on the weight of every Linear of the decoder and on the output
head (see `attach` for a frozen or tied head): the forward pass computes with each weight as onnxruntime's
MatMulNBits quantizer stores it (symmetric, 4 bits, blocks along the input), the backward pass hands the
gradient to the unrounded weight unchanged. `bake` writes the rounded weights into the model, so its
int4 export rounds every such weight to itself.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def round_int4(w: torch.Tensor, block: int) -> torch.Tensor:
    """`w` (N, K), a Linear's weight, rounded as MatMulNBits (bits 4, symmetric) stores W^T: each output
    row in blocks of `block` inputs (the last one zero-padded). Per block, with m its weight of largest
    magnitude (sign kept): s = m / -8, q = clamp(round(w / s), -8, 7), and the block becomes q * s.
    An all-zero block stays zero. Returns (N, K)."""
    n, k = w.shape
    x = nn.functional.pad(w, (0, (-k) % block)).reshape(n, -1, block)  # (N, K/B, B)
    hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)  # (N, K/B, 1) each
    m = torch.where(hi >= -lo, hi, lo)
    s = torch.where(m == 0, torch.ones_like(m), m / -8)
    return x.div(s).round_().clamp_(-8, 7).mul_(s).reshape(n, -1)[:, :k]


class RoundInt4(nn.Module):
    """Parametrization: the forward value is `round_int4(w)`, the gradient flows to `w` as if unrounded."""

    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (round_int4(w.detach(), self.block) - w).detach()


def linears(model) -> list[nn.Linear]:
    """The Linear layers of the decoder: what the int4 export quantizes besides the output head."""
    return [m for m in model.get_decoder().modules() if isinstance(m, nn.Linear)]


def attach(model, block: int) -> int:
    """From now on, compute with every decoder Linear's weight rounded, and with the output head's: an
    untied head that trains is rounded the same way; a frozen head (by default tied to the frozen
    embeddings, which then take the rounded values too) is rounded once, in place. A trainable head tied
    to the embeddings is left alone. Returns how many weights are rounded. The weights stay the same
    Parameter objects, so an optimizer built before keeps them."""
    head, done = model.get_output_embeddings(), 0
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    trained = [head] if head is not None and not tied and head.weight.requires_grad else []
    for m in linears(model) + trained:
        if not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", RoundInt4(block))
        done += 1
    if head is not None and not head.weight.requires_grad:
        with torch.no_grad():
            head.weight.copy_(round_int4(head.weight, block))
        done += 1
    return done


def attached(model) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for m in model.modules() if isinstance(m, nn.Linear))


def bake(model) -> int:
    """Replace each rounded weight by its rounded value and drop the rounding; returns how many."""
    done = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            done += 1
    return done
