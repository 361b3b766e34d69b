"""Structured pruning (torch-pruning): MLP hidden units, GQA-aware attention heads, whole layers.

What is removed, the same amount in every layer, so that the model's config describes the new
shapes and `save_pretrained` / `from_pretrained` round-trip:
- MLP hidden units (`prune.mlp_ratio`): rows of `gate_proj` / `up_proj` and the matching columns of
  `down_proj`, found by torch-pruning's dependency graph (MetaPruner, one ratio per layer);
- attention heads (`prune.heads`), respecting grouped-query attention: the same number of query heads
  from every KV group (`query`), or whole KV groups with their query heads (`kv_groups`);
- whole decoder layers (`prune.drop_layers`).
Importance is first-order Taylor, |w * dL/dw| summed over a unit's weights with the gradients of the
language-model loss on calibration batches of the train split, or the weights' magnitude.
"""
from __future__ import annotations

import warnings

import torch

from compress import training
from compress.console import say
from compress.errors import CompressError, Problem, raise_if

HEADS = ("none", "query", "kv_groups")
IMPORTANCE = ("taylor", "magnitude")


# --------------------------------------------------------------------------- checks


def linear_names(model) -> list[str]:
    """The model's linear layers, with layer numbers written as `*` (one line per kind)."""
    names = {".".join("*" if p.isdigit() else p for p in n.split("."))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check(model, pcfg) -> None:
    """Everything about `prune` that needs the model: targets, heads, layers; every problem at once."""
    c, problems = model.config, []
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    fused = any(n.endswith("mlp.gate_up_proj") for n in linears)  # Phi-3: gate and up in one projection
    for t in pcfg.targets:
        if not any(_matches(n, t) for n in linears) and not (fused and t in ("gate_proj", "up_proj")):
            problems.append(Problem("prune.targets", t, "no module matched this target; the model's linear "
                                    f"layers are: {', '.join(linear_names(model))}"))
    if not all(hasattr(c, k) for k in ("intermediate_size", "num_attention_heads", "num_hidden_layers")) \
            or not hasattr(getattr(model, "model", None), "layers"):
        problems.append(Problem("student", type(model).__name__, "pruning supports Llama-style models "
                                "(model.layers with self_attn.q/k/v/o_proj and an MLP); set prune.mlp_ratio=0 "
                                "and drop this stage from the pipeline for other architectures"))
    bad = [i for i in pcfg.drop_layers if not 0 <= i < c.num_hidden_layers]
    if bad or len(set(pcfg.drop_layers)) >= c.num_hidden_layers:
        problems.append(Problem("prune.drop_layers", list(pcfg.drop_layers), f"need distinct indices in "
                                f"[0, {c.num_hidden_layers - 1}], keeping at least one layer"))
    if pcfg.heads != "none" and pcfg.head_ratio > 0 and any(n.endswith("qkv_proj") for n in linears):
        problems.append(Problem("prune.heads", pcfg.heads, f"{type(model).__name__} fuses q, k and v in one "
                                "projection (qkv_proj), which head pruning does not split; set prune.heads=none "
                                "(MLP units and whole layers prune fine)"))
    elif pcfg.heads != "none" and pcfg.head_ratio > 0 and _heads_removed(c, pcfg) == 0:
        problems.append(Problem("prune.head_ratio", pcfg.head_ratio, f"removes no whole head with {_head_desc(c)}; "
                                "raise it, or set prune.heads=none"))
    raise_if(problems, "bad prune settings")


def _head_desc(c) -> str:
    return f"{c.num_attention_heads} query heads in {c.num_key_value_heads} KV groups"


def _heads_removed(c, pcfg) -> int:
    """Query heads removed per KV group (query) or KV groups removed (kv_groups); keeps at least one."""
    n = c.num_attention_heads // c.num_key_value_heads if pcfg.heads == "query" else c.num_key_value_heads
    return min(n - 1, round(pcfg.head_ratio * n))


# --------------------------------------------------------------------------- importance


def calibration_gradients(model, tok, cfg, splits) -> None:
    """Accumulate d(LM loss)/dw in every `.grad` over `prune.calibration_batches` train batches."""
    p = cfg.prune
    n = p.calibration_batches * p.calibration_batch_size
    train = splits.train[:n]
    if not train:
        raise CompressError(Problem("data.train_size", cfg.data.train_size, "Taylor importance needs train "
                                    "examples; raise data.train_size or set prune.importance=magnitude"))
    items = training.encode_examples(tok, cfg.data, [e.text for e in train],
                                     [splits.answer(e) for e in train], cfg.distill.max_length)
    model.train()
    model.zero_grad()
    for batch in training.loader(items, p.calibration_batch_size, tok.pad_token_id, shuffle=False):
        ids, attn = batch["input_ids"], batch["attention_mask"]  # (B, T)
        labels = ids.masked_fill(attn == 0, -100)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
        (loss / len(items)).backward()
    model.eval()


def _score(weight: torch.Tensor, importance: str, dim: int) -> torch.Tensor:
    """Per-row (dim=1) or per-column (dim=0) importance of a weight: sum |w * g| or sum w^2."""
    x = (weight * weight.grad).abs() if importance == "taylor" else weight.pow(2)
    return x.detach().float().sum(dim=dim)


def head_scores(attn, importance: str, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query head scores (H,), KV group scores (G,)) from q/o (and k/v) weights."""
    q = _score(attn.q_proj.weight, importance, 1) + _score(attn.o_proj.weight, importance, 0)  # (H * d,)
    kv = _score(attn.k_proj.weight, importance, 1) + _score(attn.v_proj.weight, importance, 1)  # (G * d,)
    q, kv = q.view(-1, head_dim).sum(1), kv.view(-1, head_dim).sum(1)  # (H,), (G,)
    return q, kv + q.view(len(kv), -1).sum(1)


# --------------------------------------------------------------------------- pruning


def prune_mlp(model, pcfg, example: torch.Tensor) -> int:
    """Remove `mlp_ratio` of every MLP's hidden units (torch-pruning MetaPruner); return the new width."""
    import torch_pruning as tp

    targets = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and any(_matches(n, t) for t in pcfg.targets)]
    ignored = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
               and not any(m is t for t in targets)]
    importance = tp.importance.GroupTaylorImportance() if pcfg.importance == "taylor" \
        else tp.importance.GroupMagnitudeImportance(p=2)
    with warnings.catch_warnings():  # "unwrapped parameters": the norms' weights, on the hidden axis, stay whole
        warnings.simplefilter("ignore", UserWarning)
        pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=pcfg.mlp_ratio,
                                      ignored_layers=ignored, round_to=pcfg.round_to, global_pruning=False,
                                      forward_fn=lambda m, x: m(input_ids=x, use_cache=False))
        pruner.step()
    widths = {layer.mlp.down_proj.in_features for layer in model.model.layers}
    if len(widths) != 1:  # LlamaConfig holds one intermediate_size
        raise RuntimeError(f"MLP widths differ after pruning: {sorted(widths)}")
    model.config.intermediate_size = widths.pop()
    return model.config.intermediate_size


def kept_width(n: int, ratio: float, round_to: int) -> int:
    """MLP units kept of `n` when `ratio` of them go, rounded down to a multiple of `round_to` (at least one)."""
    keep = n - int(n * ratio)
    return max(round_to, keep - keep % round_to) if round_to < n else keep


def prune_fused_mlp(model, pcfg) -> int:
    """Phi-3's fused MLP: `gate_up_proj` holds the gate rows, then the up rows. Remove the same units from
    both halves and the matching columns of `down_proj`, ranked by importance summed over the three
    (torch-pruning's graph sees one layer, not two halves); return the new width."""
    n = model.config.intermediate_size
    keep_n = kept_width(n, pcfg.mlp_ratio, pcfg.round_to)
    for layer in model.model.layers:
        gate_up, down = layer.mlp.gate_up_proj, layer.mlp.down_proj
        rows = _score(gate_up.weight, pcfg.importance, 1)  # (2n,)
        score = rows[:n] + rows[n:] + _score(down.weight, pcfg.importance, 0)  # (n,)
        keep = score.argsort(descending=True)[:keep_n].sort().values  # (keep_n,)
        layer.mlp.gate_up_proj = _rows(gate_up, torch.cat([keep, keep + n]))
        layer.mlp.down_proj = _columns(down, keep)
    model.config.intermediate_size = keep_n
    return keep_n


def _rows(linear: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.utils.skip_init(torch.nn.Linear, linear.in_features, len(idx), bias=linear.bias is not None,
                                   dtype=linear.weight.dtype)  # no random init: the global RNG stays untouched
    new.weight.data = linear.weight.data[idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[idx].clone()
    return new


def _columns(linear: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.utils.skip_init(torch.nn.Linear, len(idx), linear.out_features, bias=linear.bias is not None,
                                   dtype=linear.weight.dtype)
    new.weight.data = linear.weight.data[:, idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


def prune_heads(model, pcfg, scores: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Remove query heads within every KV group, or whole KV groups; update the config."""
    import torch_pruning as tp

    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    heads, groups = c.num_attention_heads, c.num_key_value_heads
    rep, k = heads // groups, _heads_removed(c, pcfg)
    for layer, (q_score, g_score) in zip(model.model.layers, scores):
        attn = layer.self_attn
        if pcfg.heads == "query":  # the k least important query heads of each group
            drop_q = [g * rep + int(i) for g in range(groups) for i in q_score.view(groups, rep)[g].argsort()[:k]]
            drop_kv = []
        else:  # the k least important groups, with all their query heads
            drop_kv = [int(g) for g in g_score.argsort()[:k]]
            drop_q = [g * rep + i for g in drop_kv for i in range(rep)]
        rows = lambda hs: [h * d + j for h in sorted(hs) for j in range(d)]  # noqa: E731
        tp.prune_linear_out_channels(attn.q_proj, rows(drop_q))
        tp.prune_linear_in_channels(attn.o_proj, rows(drop_q))
        if drop_kv:
            tp.prune_linear_out_channels(attn.k_proj, rows(drop_kv))
            tp.prune_linear_out_channels(attn.v_proj, rows(drop_kv))
    new_heads = heads - (k * groups if pcfg.heads == "query" else k * rep)
    new_groups = groups - (k if pcfg.heads == "kv_groups" else 0)
    c.num_attention_heads, c.num_key_value_heads, c.head_dim = new_heads, new_groups, d
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = new_heads // new_groups


def drop_layers(model, indices: list[int]) -> None:
    """Remove whole decoder layers; renumber the rest."""
    keep = [i for i in range(len(model.model.layers)) if i not in set(indices)]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def prune(model, tok, cfg, splits) -> dict:
    """Prune `model` in place as `cfg.prune` says; return what changed."""
    p = cfg.prune
    c = model.config
    before = {"intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": c.num_hidden_layers}
    if p.importance == "taylor":
        calibration_gradients(model, tok, cfg, splits)
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    scores = [head_scores(layer.self_attn, p.importance, d) for layer in model.model.layers] \
        if p.heads != "none" and p.head_ratio > 0 else None
    if p.mlp_ratio > 0 and hasattr(model.model.layers[0].mlp, "gate_up_proj"):
        prune_fused_mlp(model, p)
    elif p.mlp_ratio > 0:
        prune_mlp(model, p, torch.tensor([tok("Hello world")["input_ids"]]))
    if scores is not None:
        say("  [yellow]heads pruned[/]: config.head_dim is kept explicit; optimum's ONNX export derives "
            "head_dim = hidden_size / heads and fails on this model (use prune.heads=none to export)")
        prune_heads(model, p, scores)
    if p.drop_layers:
        drop_layers(model, list(p.drop_layers))
    model.zero_grad(set_to_none=True)
    after = {k: getattr(c, k) for k in before}
    return {"before": before, "after": after}
