"""The teacher writes new inputs for the transfer set (`data.synthetic_unlabeled`): more examples for
distillation at no labelling cost.

Each prompt is SHOTS real inputs (their labels never shown), each followed by a separator (a newline, or
a `###` line when some input spans lines); the teacher samples what comes next, the next input, until it
writes the separator or an end-of-sequence token.
A written input is kept when it is
  finished   the separator or EOS came within the token budget (a cut-off input is not one);
  long       at least MIN_WORDS words;
  new        no real input and no earlier written one has the same words (case and punctuation aside);
  clean      it shares no run of NEAR_WORDS words with any eval input (nor equals a shorter one),
             so the eval split never leaks into training through the teacher.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter

import torch

from compress.console import progress

SHOTS = 3
"""Real inputs shown in each prompt."""
SEPARATORS = ("\n", "\n###\n")
"""What ends every input of a prompt: a newline, or a `###` line for inputs of several lines."""
TEMPERATURE, TOP_P = 1.0, 0.95
"""Sampling: the teacher's own distribution, its 5% least likely tail cut."""
MIN_WORDS = 3
NEAR_WORDS = 8
MAX_TRIES = 4
"""Stop after writing MAX_TRIES * n candidates, kept or not (a teacher that mostly copies)."""


def words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", text.lower()))


def ngrams(text: str, n: int = NEAR_WORDS) -> set[tuple[str, ...]]:
    """The text's runs of n words; a shorter text is its one run."""
    w = words(text)
    return {w[i: i + n] for i in range(len(w) - n + 1)} or {w}


def verdict(text: str | None, seen: set, near: set) -> str:
    """Why a written input is dropped ('unfinished', 'short', 'duplicate', 'near_eval'), or 'kept'."""
    if text is None:
        return "unfinished"
    w = words(text)
    if len(w) < MIN_WORDS:
        return "short"
    if w in seen:
        return "duplicate"
    if ngrams(text) & near:
        return "near_eval"
    return "kept"


def token_budget(tok, pool: list[str]) -> int:
    """New tokens allowed per input: 1.5x the 95th-percentile length of (up to 256 of) the real inputs."""
    lengths = sorted(len(tok(t, add_special_tokens=False)["input_ids"]) for t in pool[:256])
    return max(8, math.ceil(1.5 * lengths[int(0.95 * (len(lengths) - 1))]))


def separator(pool: list[str]) -> str:
    return SEPARATORS[any("\n" in t for t in pool)]


@torch.inference_mode()
def sample(model, tok, prompts: list[str], sep: str, max_new_tokens: int, eos: list[int]) -> list[str | None]:
    """One sampled continuation per prompt, cut at the separator or EOS; None where neither came."""
    device = next(model.parameters()).device
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)  # with BOS where the tokenizer adds one
    tok.padding_side = "right"
    enc.pop("token_type_ids", None)
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                         top_k=0, stop_strings=[sep.strip() or sep], tokenizer=tok, pad_token_id=tok.pad_token_id,
                         eos_token_id=eos or None, use_model_defaults=False)[:, enc["input_ids"].shape[1]:]  # (B, N)
    out = []
    for row in gen.tolist():
        ends = [j for j, t in enumerate(row) if t in eos]
        text = tok.decode(row[: ends[0]] if ends else row, skip_special_tokens=True)
        stop = sep.strip() or sep
        out.append(text.split(stop)[0].strip() if stop in text or ends else None)
    return out


def write_inputs(model, tok, pool: list[str], avoid: list[str], n: int, seed: int, eos: list[int],
                 batch_size: int = 32) -> tuple[list[str], dict[str, int]]:
    """Up to `n` new inputs written by `model` from few-shot prompts of `pool` (real inputs), none near
    `avoid` (the eval inputs); and how many candidates met each verdict. Sampling draws on its own
    seeded generator state: the caller's random streams are left as they were."""
    rng = random.Random(seed)
    seen, near = {words(t) for t in pool}, set().union(*(ngrams(t) for t in avoid)) if avoid else set()
    budget, sep, kept, counts = token_budget(tok, pool), separator(pool), [], Counter()
    with torch.random.fork_rng(), progress() as bar:
        torch.manual_seed(seed)
        task = bar.add_task("teacher: writing inputs", total=n)
        while len(kept) < n and counts.total() < MAX_TRIES * n:
            rows = min(batch_size, max(8, 2 * (n - len(kept))))  # a few spare for the ones dropped
            prompts = [sep.join(rng.sample(pool, min(SHOTS, len(pool)))) + sep for _ in range(rows)]
            for text in sample(model, tok, prompts, sep, budget, eos):
                v = verdict(text, seen, near)
                counts[v] += 1
                if v == "kept":
                    kept.append(text)
                    seen.add(words(text))
                    bar.advance(task)
                if len(kept) == n:
                    break
    return kept, dict(counts)
