"""Distillation: a student learns from a frozen teacher in a Lightning module.

loss = soft_weight * KD_T(student, teacher) + pseudo_weight * CE(teacher's answers)
     + hard_weight * CE(gold answers)
and, on the `on_policy_ratio` of the steps where the student writes the answers itself (GKD),
loss = soft_weight * D(student, teacher) on the student's tokens (+ the hidden-state term).

The teacher is frozen and in eval mode, and is not a submodule of the LightningModule:
it gets no gradients, no optimizer state and no place in checkpoints. Its logits come on
the fly, or with `distill.topk_cache=K` from a top-K cache computed once into the artifact (on a
label task with soft labels on the answer only, read off the pass that finds the pseudo-labels; that
pass then also keeps the teacher's hidden states on each prompt for the hidden-state term, so training
never runs the teacher).
Pseudo-labels for the `unlabeled` split are the teacher's most likely verbalizer among each
example's choices (label tasks) or its greedy continuation (text).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from compress import training
from compress.console import progress
from compress.data import ANSWER_END, Example, Splits
from compress.errors import CompressError, Problem
from compress.evaluate import (build_prompt, encode_requests, eos_ids, generate_greedy, score_accuracy,
                               torch_generate_fn, torch_logits_fn)
from students import losses, quant_aware

DIVERGENCES = {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl, "jsd": losses.generalized_jsd}


class DistillModule(L.LightningModule):
    """Trains `student` to match a frozen `teacher` (or its cached top-K log-probs)."""

    def __init__(self, student, teacher, dcfg, topk: dict | None = None, pad_id: int = 0,
                 eos: list[int] | None = None, hidden: dict | None = None):
        super().__init__()
        self.student, self.dcfg, self.topk = student, dcfg, topk
        self.pad_id, self.eos = pad_id, list(eos or [])
        """Padding of the student's on-policy answers, and the tokens that end one."""
        self.layer_map = (hidden["layers"] if hidden is not None else
                          layer_map(student.config, teacher.config, dcfg.hidden_weight) if teacher is not None else [])
        """Teacher hidden-state index paired with each student layer's output (hidden_weight > 0)."""
        self.hidden = hidden["states"] if hidden is not None else None
        """Per training item (`batch["index"]`): the teacher's hidden states at `layer_map` on its prompt,
        (P, L, H) bf16, read off the pseudo-labelling pass (None for an item whose prompt was cut); None
        when the teacher runs on the fly."""
        self.__dict__["teacher"] = teacher  # plain attribute, not a submodule
        self.strict_loading = False

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval().requires_grad_(False)

    def losses(self, batch) -> dict[str, torch.Tensor]:
        """Each weighted term of the loss, computed at the positions it reads.

        The vocabulary projection (the costliest matmul of a small model: 49,152 x 576 for
        SmolLM2) runs only on the rows some term reads: every real token when the soft term
        covers all positions, else the answer tokens alone.
        """
        d = self.dcfg
        ids, attn = batch["input_ids"], batch["attention_mask"]  # (B, T)
        valid = attn[:, 1:].bool()  # (B, T-1): position t predicts ids[:, t+1]
        answer = batch["answer_mask"][:, 1:] & valid
        rows = valid if d.soft_weight > 0 and d.soft_on == "all" else answer  # (B, T-1)
        s_out = self.student.get_decoder()(input_ids=ids, attention_mask=attn,
                                           output_hidden_states=d.hidden_weight > 0)
        logits = self.student.get_output_embeddings()(s_out.last_hidden_state[:, :-1][rows])[None]  # (1, N, V)
        kind = batch["kind"][:, None].expand_as(rows)[rows][None]  # (1, N): 0 gold, 1 pseudo
        target, on = ids[:, 1:][rows][None], answer[rows][None]  # (1, N)
        out = {}
        reads_teacher = self.teacher is not None and (d.soft_weight > 0 or d.hidden_weight > 0)
        t_out = self._teacher(batch, d.hidden_weight > 0) if reads_teacher else None  # pseudo/hard only: no teacher
        if d.soft_weight > 0:
            out["soft"] = self._soft(batch, rows, logits, t_out)
        own = batch.get("on_policy", False)  # the student's own answers: nothing to imitate, only the teacher's judgement
        if d.pseudo_weight > 0 and not own:
            out["pseudo"] = losses.cross_entropy(logits, target, on & (kind == 1))
        if d.hard_weight > 0 and not own:
            out["hard"] = losses.cross_entropy(logits, target, on & (kind == 0))
        if d.hidden_weight > 0:
            mask = attn.bool().clone()  # (B, T)
            mask[:, 0] = False  # the first position holds the attention sink's outsized activations
            if self.hidden is not None:
                t_hidden, mask = self._cached_hidden(batch["index"].tolist(), mask)
            else:
                t_hidden = [t_out.hidden_states[i] for i in self.layer_map]
            out["hidden"] = losses.hidden_cosine([s_out.hidden_states[j + 1] for j in range(len(self.layer_map))],
                                                 t_hidden, mask)
        return out

    def _cached_hidden(self, index: list[int], mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The batch's cached teacher states, one (B, T, H) per paired layer, and `mask` narrowed to the
        positions they cover (each item's prompt: the answer tokens have no cached state)."""
        (b_size, width), h = mask.shape, self.student.config.hidden_size
        states = torch.zeros(b_size, width, len(self.layer_map), h, dtype=torch.bfloat16)  # (B, T, L, H)
        covered = torch.zeros(b_size, width, dtype=torch.bool)  # (B, T)
        for b, i in enumerate(index):
            if (cached := self.hidden[i]) is not None:
                states[b, : len(cached)], covered[b, : len(cached)] = cached, True
        return list(states.to(self.device).unbind(2)), mask & covered.to(mask.device)

    def on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` trains on the student's own answers: `on_policy_ratio` of the
        steps, spread evenly (ratio 0.25: steps 3, 7, 11, ...)."""
        r = getattr(self.dcfg, "on_policy_ratio", 0.0)  # prune's recovery reuses these settings
        return r > 0 and int((step + 1) * r) > int(step * r)

    @torch.no_grad()
    def student_answers(self, batch) -> dict:
        """The batch with every answer replaced by one the student samples from the same prompt, at most as
        many tokens as the answer it replaces, ended by an EOS token, collated as training
        batches are (`training.collate`); `answer_mask` marks the sampled tokens."""
        ids, answer = batch["input_ids"], batch["answer_mask"]  # (B, T)
        starts, lengths = answer.int().argmax(1).tolist(), answer.sum(1).tolist()  # (B,) each
        width = max(starts)
        prompts = torch.full((len(starts), width), self.pad_id, dtype=ids.dtype, device=ids.device)  # (B, P)
        p_mask = torch.zeros_like(prompts)
        for i, s in enumerate(starts):  # left-padded for generation
            prompts[i, width - s:], p_mask[i, width - s:] = ids[i, :s], 1
        was_training = self.student.training
        self.student.eval()
        gen = self.student.generate(input_ids=prompts, attention_mask=p_mask, max_new_tokens=max(lengths),
                                    do_sample=True, temperature=self.dcfg.on_policy_temperature, top_k=0, top_p=1.0,
                                    pad_token_id=self.pad_id, eos_token_id=self.eos or None, use_cache=True,
                                    use_model_defaults=False)[:, width:]  # (B, N)
        self.student.train(was_training)
        items = []
        for i, (s, n) in enumerate(zip(starts, lengths)):
            new = gen[i, :n].tolist()
            ends = [j for j, t in enumerate(new) if t in self.eos]
            new = torch.tensor(new[: ends[0] + 1] if ends else new, dtype=ids.dtype, device=ids.device)
            items.append({"input_ids": torch.cat([ids[i, :s], new]), "kind": 1,
                          "answer_mask": torch.arange(s + len(new), device=ids.device) >= s})
        out = {k: v.to(ids.device) for k, v in training.collate(self.pad_id)(items).items()}
        return {**out, "on_policy": True}

    @torch.no_grad()
    def _teacher(self, batch, hidden: bool):
        return self.teacher.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          output_hidden_states=hidden)

    def _soft(self, batch, rows: torch.Tensor, logits: torch.Tensor, t_out) -> torch.Tensor:
        d = self.dcfg
        ones = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)  # (1, N): every row counts
        if self.topk is not None:
            idx, width = batch["index"].cpu(), rows.shape[1]  # the cache stays in host memory
            sel = rows.cpu()
            values, indices, tail = (self.topk[k][idx, :width][sel][None].to(self.device)
                                     for k in ("values", "indices", "tail"))
            return losses.topk_forward_kl(logits, values, indices.long(), tail, ones, d.temperature)
        with torch.no_grad():
            t_logits = self.teacher.get_output_embeddings()(t_out.last_hidden_state[:, :-1][rows])[None]  # (1, N, V')
        v = min(logits.shape[-1], t_logits.shape[-1])  # padded vocab rows (e.g. 152064 vs 151936) are dropped
        extra = {"beta": d.jsd_beta} if d.divergence == "jsd" else {}
        return DIVERGENCES[d.divergence](logits[..., :v], t_logits[..., :v], ones, temperature=d.temperature, **extra)

    def quant_aware(self, step: int) -> bool:
        """Whether optimizer step `step` trains through the int4 weights: the last `quant_aware_steps`."""
        n = getattr(self.dcfg, "quant_aware_steps", 0)  # prune's recovery reuses these settings
        return n > 0 and step >= self.dcfg.max_steps - n

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.quant_aware(self.global_step) and not quant_aware.attached(self.student):
            quant_aware.attach(self.student, self.dcfg.quant_aware_block_size)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint saved while the weights were rounded names them `...parametrizations.weight.original`:
        round again before Lightning loads it, or those weights would not load."""
        if any(".parametrizations.weight." in k for k in checkpoint["state_dict"]):
            quant_aware.attach(self.student, self.dcfg.quant_aware_block_size)

    def training_step(self, batch, _):
        on_policy = self.on_policy(self.global_step)
        parts = self.losses(self.student_answers(batch) if on_policy else batch)
        d = self.dcfg
        weights = {"soft": d.soft_weight, "pseudo": d.pseudo_weight, "hard": d.hard_weight,
                   "hidden": d.hidden_weight}
        total = sum(weights[k] * v for k, v in parts.items())
        for k, v in parts.items():
            self.log(f"train/{k}_on_policy" if on_policy else f"train/{k}", v)
        self.log("train/loss", total, prog_bar=True)
        return total

    def validation_step(self, batch, _):
        parts = self.losses(batch)
        for k, v in parts.items():
            self.log(f"val/{k}", v, prog_bar=k == "pseudo")

    def configure_optimizers(self):
        return training.optimizer_and_schedule(self.student.parameters(), self.dcfg, self._trainer)


# --------------------------------------------------------------------------- checks


def check_tokenizers(teacher_tok, student_tok, soft_weight: float) -> None:
    """Soft labels compare distributions token by token: the token -> id maps must match."""
    if soft_weight <= 0:
        return
    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t == s:
        return
    differ = sum(1 for tok, i in s.items() if t.get(tok) != i) + sum(1 for tok in t if tok not in s)
    raise CompressError(Problem("distill.soft_weight", soft_weight, f"the teacher's and the student's tokenizers "
                                f"differ ({len(t)} vs {len(s)} tokens, {differ} tokens mapped differently): "
                                "soft labels need the same vocabulary; set distill.soft_weight=0 to distil through "
                                "pseudo-labels only (they work across tokenizers), or pick a student that shares "
                                "the teacher's tokenizer"))


def layer_map(student_config, teacher_config, hidden_weight: float) -> list[int]:
    """For each student layer, the index into the teacher's hidden states it should reproduce.

    A student cut from the teacher (`compress_kept_layers` in its config) pairs layer j with
    the teacher's residual stream where the next kept layer reads it; the last layer pairs with
    the teacher's output. Other students pair layers uniformly by depth.
    """
    if hidden_weight <= 0:
        return []
    n_s, n_t = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    if student_config.hidden_size != teacher_config.hidden_size:
        raise CompressError(Problem("distill.hidden_weight", hidden_weight, f"hidden-state distillation pairs "
                                    f"student and teacher activations, but their widths differ "
                                    f"({student_config.hidden_size} vs {teacher_config.hidden_size}); "
                                    "set distill.hidden_weight=0 for this student"))
    kept = list(getattr(student_config, "compress_kept_layers", None) or [])
    if len(kept) == n_s:
        return [kept[j + 1] if j + 1 < n_s else n_t for j in range(n_s)]
    return [round((j + 1) * n_t / n_s) for j in range(n_s)]


# --------------------------------------------------------------------------- pseudo-labels


def teacher_answers(teacher, tok, examples: list[Example], splits, cfg, soft_k: int = 0,
                    hidden_layers: list[int] | None = None) -> tuple[list[str], dict | None, list | None]:
    """Label tasks: the continuation of the most likely of each example's choices (the shared labels or
    its own); generative tasks: the teacher's greedy answer to the prompt (sequence-level KD), ended by a
    newline; text tasks: the greedy continuation.

    With `soft_k` > 0 on a label task, also the teacher's top-K log-probs at each token of the answer it
    chose (`answer_topk`), read off the same forward passes: the soft labels of `soft_on=answer` at no
    extra teacher cost. None otherwise. With `hidden_layers` as well, the teacher's hidden states at those
    indices on each example's tokens as that pass saw them: per example (token ids (S,), states (S, L, H)
    bf16), the prompt first (`hidden_states_on_prompts` keeps the prompt's part). None otherwise."""
    if splits.generative:
        chat = bool(cfg.data.use_chat_template and getattr(tok, "chat_template", None))
        prompts = [build_prompt(tok, e.text, cfg.data) for e in examples]
        gen_fn = torch_generate_fn(teacher, tok.pad_token_id, eos_ids(tok, teacher.generation_config))
        answers = generate_greedy(gen_fn, tok, prompts, chat, cfg.distill.pseudo_max_new_tokens,
                                  cfg.distill.pseudo_batch_size, "teacher: pseudo-labels (answers)")
        return [a + ANSWER_END for a in answers], None, None
    if splits.labelled:
        # labels are hidden: scored as an eval split whose accuracy is not read
        unl = Splits(train=[], unlabeled=[], eval=[Example(e.text, None, e.choices) for e in examples],
                     perplexity=[], verbalizers=splits.verbalizers)
        layers = list(hidden_layers or []) if soft_k else []
        logits_fn, last = hidden_logits_fn(teacher, layers) if layers else (torch_logits_fn(teacher), {})
        kept: dict[tuple[int, int], tuple] = {}
        seen: dict[int, tuple] = {}

        def keep(i: int, j: int, rows: torch.Tensor, b: int) -> None:  # rows (L, V): the logits of choice j's tokens
            kept[i, j] = tuple(t[0].cpu() for t in losses.teacher_topk(rows[None], soft_k, cfg.distill.temperature))
            if layers and i not in seen:  # every choice shares the prompt's states: keep the first sequence's
                n = last["lengths"][b]
                seen[i] = (last["ids"][b, :n].clone(), last["hidden"][b, :n].clone())

        preds = score_accuracy(logits_fn, tok, unl, cfg.data, cfg.distill.pseudo_batch_size,
                               "teacher: pseudo-labels", on_rows=keep if soft_k else None)["predictions"]
        answers = [splits.continuations(e)[p] for e, p in zip(examples, preds)]
        if not soft_k:
            return answers, None, None
        chosen = [list(splits.continuations(e)).index(p) for e, p in zip(examples, preds)]
        hidden = [seen[i] for i in range(len(examples))] if layers else None
        return answers, stack_answer_topk([kept[i, j] for i, j in enumerate(chosen)]), hidden
    return continue_greedy(teacher, tok, [e.text for e in examples], cfg.distill.pseudo_max_new_tokens), None, None


def hidden_logits_fn(model, layers: list[int]):
    """A `torch_logits_fn` that also keeps, from the batch it ran last, the hidden states at `layers`
    (`last["hidden"]`: (B, T, L, H) bf16 on the host), the token ids (B, T) and each row's length."""
    device, last = next(model.parameters()).device, {}

    @torch.inference_mode()
    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions=None) -> torch.Tensor:
        keep = {} if positions is None else {"logits_to_keep": torch.tensor(positions, device=device)}
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                    output_hidden_states=True, **keep)
        last["hidden"] = torch.stack([out.hidden_states[i] for i in layers], dim=2).to(torch.bfloat16).cpu()
        last["ids"], last["lengths"] = input_ids.cpu(), attention_mask.sum(1).tolist()
        return out.logits  # (B, K, V)

    return logits, last


def hidden_states_on_prompts(hidden: list[tuple], items: list[dict]) -> list[torch.Tensor | None]:
    """Per training item (in the order the teacher scored its example), the teacher's states on the item's
    prompt tokens (P, L, H); None where the item's prompt is not the one the teacher saw (cut from the
    left to `distill.max_length`): that item then skips the hidden-state term."""
    out = []
    for (ids, states), it in zip(hidden, items, strict=True):
        p = int((~it["answer_mask"]).sum())
        out.append(states[:p] if p <= len(ids) and torch.equal(ids[:p], it["input_ids"][:p]) else None)
    return out


def hidden_cache_bytes(tok, examples: list[Example], cfg, layers: list[int], width: int) -> int:
    """Host memory the teacher's hidden states on every prompt take (bf16), counted before the pass."""
    chat = bool(cfg.data.use_chat_template and getattr(tok, "chat_template", None))
    requests = encode_requests(tok, [build_prompt(tok, e.text, cfg.data) for e in examples], [], chat)
    return sum(len(ctx) for ctx, _ in requests) * len(layers) * width * 2


def stack_answer_topk(rows: list[tuple]) -> dict:
    """Per example (values (L, K), indices (L, K), tail (L,)) -> padded tensors: values (N, A, K) fp16,
    indices (N, A, K) int32, tail (N, A) fp32 (-inf past an answer's L tokens), lengths (N,)."""
    n, a, k = len(rows), max(len(r[2]) for r in rows), rows[0][0].shape[-1]
    out = {"values": torch.zeros(n, a, k, dtype=torch.float16), "indices": torch.zeros(n, a, k, dtype=torch.int32),
           "tail": torch.full((n, a), float("-inf")), "lengths": torch.tensor([len(r[2]) for r in rows])}
    for i, (v, ix, t) in enumerate(rows):
        out["values"][i, : len(t)], out["indices"][i, : len(t)], out["tail"][i, : len(t)] = v, ix, t.float()
    return out


def expand_answer_topk(answer_topk: dict, items: list[dict]) -> dict:
    """The answer-only cache laid out as `build_topk_cache`'s (N, T-1, K), rows at each item's answer
    positions (position t predicts token t+1), so that training reads either alike.
    `items` are the training items in the order the cache was built (one per scored example)."""
    width, k = max(len(it["input_ids"]) for it in items) - 1, answer_topk["values"].shape[-1]
    values = torch.zeros(len(items), width, k, dtype=torch.float16)  # (N, T-1, K)
    indices = torch.zeros(len(items), width, k, dtype=torch.int32)
    tail = torch.full((len(items), width), float("-inf"))  # (N, T-1)
    for i, it in enumerate(items):
        at = it["answer_mask"][1:].nonzero().flatten()  # (L,)
        n = int(answer_topk["lengths"][i])
        if len(at) != n:
            raise ValueError(f"item {i}: {len(at)} answer tokens, but the teacher's cache holds {n}")
        values[i, at], indices[i, at], tail[i, at] = (answer_topk[key][i, :n] for key in ("values", "indices", "tail"))
    return {"values": values, "indices": indices, "tail": tail}


@torch.inference_mode()
def continue_greedy(teacher, tok, texts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, left-padded batches of 8."""
    device = next(teacher.parameters()).device
    tok.padding_side, answers = "left", []
    with progress() as bar:
        task = bar.add_task("teacher: pseudo-labels (greedy)", total=len(texts))
        for i in range(0, len(texts), 8):
            enc = tok(texts[i: i + 8], return_tensors="pt", padding=True).to(device)
            enc.pop("token_type_ids", None)  # some tokenizers return it; generate() of a causal LM rejects it
            gen = teacher.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id, use_model_defaults=False)
            answers += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            bar.advance(task, len(texts[i: i + 8]))
    tok.padding_side = "right"
    return answers


# --------------------------------------------------------------------------- top-K cache


@torch.inference_mode()
def build_topk_cache(teacher, items: list[dict], k: int, temperature: float, batch_size: int, pad_id: int,
                     out: Path) -> dict:
    """The teacher's top-K log-probs (fp16), their token ids (int32) and the log tail mass (fp32)
    at every position of every training item, computed once and saved in the artifact."""
    from safetensors.torch import save_file

    device = next(teacher.parameters()).device
    width = max(len(it["input_ids"]) for it in items) - 1
    values = torch.zeros(len(items), width, k, dtype=torch.float16)  # (N, T-1, K)
    indices = torch.zeros(len(items), width, k, dtype=torch.int32)
    tail = torch.full((len(items), width), float("-inf"))  # (N, T-1)
    with progress() as bar:
        task = bar.add_task(f"teacher: top-{k} cache", total=len(items))
        for batch in training.loader(items, batch_size, pad_id, shuffle=False):
            logits = teacher(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
            v, i, t = losses.teacher_topk(logits, k, temperature)
            rows, w = batch["index"], logits.shape[1]
            values[rows, :w], indices[rows, :w], tail[rows, :w] = v.cpu(), i.cpu(), t.cpu().float()
            bar.advance(task, len(rows))
    cache = {"values": values, "indices": indices, "tail": tail}
    save_file(cache, out / "teacher_topk.safetensors.part")
    (out / "teacher_topk.safetensors.part").rename(out / "teacher_topk.safetensors")  # complete or absent
    return cache


def topk_bytes_per_token(k: int) -> int:
    """fp16 value + int32 index per kept token, plus one fp32 tail mass."""
    return k * (2 + 4) + 4
