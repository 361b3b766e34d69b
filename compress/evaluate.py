"""Accuracy, agreement, perplexity and latency: the same code for every backend.

Accuracy and perplexity only need a *logits function* `(input_ids, attention_mask) ->
logits` of shapes (B, T) -> (B, T, V), and latency a *latency function*; a backend
(PyTorch here, ONNX Runtime in compress/ort.py) is scored by passing its own to `evaluate_fns`. Accuracy compares the summed log-likelihood of each
label's verbalizer continuation, as lm-evaluation-harness does for multiple choice; each example is
scored over its own choices (the task's shared labels, or the choices it carries).
"""
from __future__ import annotations

import math
import os
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from compress.console import progress

LogitsFn = Callable[[torch.Tensor, torch.Tensor, "list[int] | None"], torch.Tensor]
"""(input_ids (B, T), attention_mask (B, T), positions) -> logits (B, K, V) at the K sorted
`positions` (all T positions when None). Scoring asks only for the positions it reads,
which spares the vocabulary projection for every other token."""

Request = tuple[list[int], list[list[int]]]
"""(context token ids, one continuation's token ids per choice); requests may differ in their number of choices."""


def torch_logits_fn(model) -> LogitsFn:
    device = next(model.parameters()).device

    @torch.inference_mode()
    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions=None) -> torch.Tensor:
        keep = {} if positions is None else {"logits_to_keep": torch.tensor(positions, device=device)}
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                    **keep)
        return out.logits  # (B, K, V)

    return logits


# --------------------------------------------------------------------------- prompts


def build_prompt(tokenizer, text: str, data_cfg) -> str:
    """The instruction in the chat template (when the tokenizer has one), then the answer prefix."""
    message = data_cfg.instruction.replace("{text}", text)
    if data_cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
        return head + data_cfg.answer_prefix
    return f"{message}\n{data_cfg.answer_prefix}" if data_cfg.answer_prefix else message


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    # A chat-templated prompt already spells out its special tokens.
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def encode_requests(tokenizer, prompts: list[str], continuations: list[str] | list[list[str]],
                    chat: bool) -> list[Request]:
    """Token ids of each prompt and of each continuation as it is tokenized after that prompt.

    `continuations`: one list for every prompt (shared choices), or one list per prompt (its own)."""
    shared = not continuations or isinstance(continuations[0], str)
    requests = []
    for n, prompt in enumerate(prompts):
        ctx = _encode(tokenizer, prompt, chat)
        conts = []
        for cont in continuations if shared else continuations[n]:
            whole = _encode(tokenizer, prompt + cont, chat)
            tail = whole[len(ctx):] if whole[: len(ctx)] == ctx else []
            conts.append(tail or _encode(tokenizer, cont, False))
        requests.append((ctx, conts))
    return requests


# --------------------------------------------------------------------------- scoring


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask  # (B, T), (B, T)


def choice_logprobs(logits_fn: LogitsFn, requests: list[Request], batch_size: int, pad_id: int,
                    desc: str = "scoring", on_rows=None) -> torch.Tensor:
    """Summed log-probability of every continuation given its context: (N, C) float32, C the most
    choices of any request; a request with fewer choices has -inf in its columns past them.

    When every continuation is one token, one forward of the context scores all choices;
    otherwise each (context + continuation) is scored separately. `on_rows(i, j, logits, b)`, if given,
    receives the logits (L, V) that predict the L tokens of continuation j of request i, and the row b of
    the batch `logits_fn` just ran that holds them (right-padded: request i's context is its first tokens).
    """
    n, c = len(requests), max(len(conts) for _, conts in requests)
    single = all(len(cont) == 1 for _, conts in requests for cont in conts)
    seqs = [(i, j, ctx if single else ctx + cont) for i, (ctx, conts) in enumerate(requests)
            for j, cont in enumerate(conts) if single is False or j == 0]
    seqs.sort(key=lambda s: -len(s[2]))  # similar lengths together: less padding
    scores = torch.full((n, c), float("-inf"), dtype=torch.float32)
    with progress() as bar:
        task = bar.add_task(desc, total=len(seqs))
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start: start + batch_size]
            ids, mask = pad([s[2] for s in batch], pad_id)
            # the positions whose next-token distribution scores a continuation token
            spans = [(len(requests[i][0]) - 1, len(seq) - 1 if not single else len(seq)) for i, _, seq in batch]
            positions = sorted({p for a, b in spans for p in range(a, b)})
            col = {p: k for k, p in enumerate(positions)}
            logits = logits_fn(ids, mask, positions)  # (B, K, V)
            for b, (i, j, seq) in enumerate(batch):
                ctx, conts = requests[i]
                if single:
                    logp = torch.log_softmax(logits[b, col[len(ctx) - 1]].float(), dim=-1)  # (V,)
                    scores[i, : len(conts)] = torch.stack([logp[cont[0]] for cont in conts]).cpu()
                    if on_rows:  # (1, V): the same row predicts every choice
                        for k in range(len(conts)):
                            on_rows(i, k, logits[b, col[len(ctx) - 1]][None], b)
                else:
                    cont = conts[j]
                    rows = logits[b, [col[p] for p in range(len(ctx) - 1, len(seq) - 1)]].float()  # (L, V)
                    logp = torch.log_softmax(rows, dim=-1)
                    scores[i, j] = logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum().cpu()
                    if on_rows:
                        on_rows(i, j, rows, b)
            bar.advance(task, len(batch))
    return scores


def score_accuracy(logits_fn: LogitsFn, tokenizer, splits, data_cfg, batch_size: int,
                   desc: str = "accuracy", on_rows=None) -> dict:
    """Predictions (label names: each example's chosen choice) on the eval split, and accuracy against
    the gold labels, with each example's score (`per_example`: 1 right, 0 wrong). Each example is scored
    over its own choices (`splits.continuations`); `on_rows` as in `choice_logprobs`."""
    chat = bool(data_cfg.use_chat_template and getattr(tokenizer, "chat_template", None))
    prompts = [build_prompt(tokenizer, e.text, data_cfg) for e in splits.eval]
    choices = [splits.continuations(e) for e in splits.eval]  # per example: choice -> continuation
    requests = encode_requests(tokenizer, prompts, [list(c.values()) for c in choices], chat)
    scores = choice_logprobs(logits_fn, requests, batch_size, tokenizer.pad_token_id, desc, on_rows)  # (N, C)
    predictions = [list(c)[k] for c, k in zip(choices, scores.argmax(dim=1).tolist())]
    right = [int(p == e.label) for p, e in zip(predictions, splits.eval)]
    return {"accuracy": sum(right) / len(right), "predictions": predictions, "per_example": {"accuracy": right}}


# --------------------------------------------------------------------------- generative tasks


GenerateFn = Callable[[list[list[int]], int, Callable[[list[int]], bool]], list[list[int]]]
"""(prompts' token ids, max new tokens, stop(new ids) -> bool) -> each prompt's greedy new tokens, EOS
excluded, ending where `stop` first holds (that token kept) or after max new tokens. Backends with a KV
cache supply their own (`torch_generate_fn`, `compress.ort.generate_fn`); `logits_generate_fn` turns any
logits function into one."""


def eos_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the generation config's (Gemma-2's
    `<end_of_turn>`, Phi-3's `<|end|>`, Llama-3's `<|eot_id|>` are not the tokenizer's EOS)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def torch_generate_fn(model, pad_id: int, eos: list[int]) -> GenerateFn:
    """Greedy decoding with the model's KV cache (transformers' `generate`), left-padded batches. The model's
    own generation defaults (sampling, temperature, repetition penalty) are ignored: greedy is greedy."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device

    class Stop(StoppingCriteria):
        def __init__(self, start: int, stop):
            self.start, self.stop = start, stop

        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:  # (B,) bool: finished
            return torch.tensor([self.stop(row[self.start:].tolist()) for row in input_ids], device=input_ids.device)

    @torch.inference_mode()
    def generate(prompts: list[list[int]], max_new_tokens: int, stop) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                  eos_token_id=list(eos) or None)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             stopping_criteria=StoppingCriteriaList([Stop(width, stop)]),
                             use_model_defaults=False)  # (B, T + N)
        return [cut(row, eos, stop) for row in out[:, width:].tolist()]

    return generate


def logits_generate_fn(logits_fn: LogitsFn, pad_id: int, eos: list[int]) -> GenerateFn:
    """Greedy decoding from a bare logits function: each step runs the right-padded batch again (no KV
    cache) and reads each sequence's next-token logits at its last real position. For backends that only
    score (llama.cpp's logits); slow for long answers."""

    def generate(prompts: list[list[int]], max_new_tokens: int, stop) -> list[list[int]]:
        seqs, new, done = [list(p) for p in prompts], [[] for _ in prompts], [False] * len(prompts)
        for _ in range(max_new_tokens):
            ids, mask = pad(seqs, pad_id)  # (B, T)
            last = sorted({len(s) - 1 for s in seqs})
            logits = logits_fn(ids, mask, last)  # (B, K, V)
            for b, s in enumerate(seqs):
                if done[b]:
                    continue
                token = int(logits[b, last.index(len(s) - 1)].argmax())
                if token in eos:
                    done[b] = True
                    continue
                s.append(token)
                new[b].append(token)
                done[b] = stop(new[b])
            if all(done):
                break
        return new

    return generate


def cut(tokens: list[int], eos: list[int], stop) -> list[int]:
    """`tokens` up to (not including) the first EOS, and up to (including) the first token where `stop` holds."""
    kept: list[int] = []
    for t in tokens:
        if t in eos:
            break
        kept.append(t)
        if stop(kept):
            break
    return kept


def generate_greedy(generate: GenerateFn, tokenizer, prompts: list[str], chat: bool, max_new_tokens: int,
                    batch_size: int, desc: str = "generating") -> list[str]:
    """Each prompt's greedy continuation, cut at the first newline (or EOS), stripped; batches of similar
    prompt lengths, in any backend's `GenerateFn`."""
    encoded = [_encode(tokenizer, p, chat) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths together
    stop = lambda new: "\n" in tokenizer.decode(new)  # noqa: E731
    out = [""] * len(prompts)
    with progress() as bar:
        task = bar.add_task(desc, total=len(prompts))
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            for i, new in zip(idx, generate([encoded[i] for i in idx], max_new_tokens, stop)):
                out[i] = tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()
            bar.advance(task, len(idx))
    return out


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    import re
    import string

    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """1 when the normalised prediction equals a normalised reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """SQuAD's token F1: the harmonic mean of token precision and recall, best over the references."""
    from collections import Counter

    def f1(pred: list[str], ref: list[str]) -> float:
        if not pred or not ref:
            return float(pred == ref)
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            return 0.0
        p, r = common / len(pred), common / len(ref)
        return 2 * p * r / (p + r)

    pred = normalize_answer(prediction).split()
    return max(f1(pred, normalize_answer(r).split()) for r in references)


def score_generation(generate: GenerateFn, tokenizer, splits, data_cfg, eval_cfg, desc: str = "generating") -> dict:
    """Greedy answers to the eval split, with exact match and F1 (best over each example's references), and
    each example's scores (`per_example`)."""
    chat = bool(data_cfg.use_chat_template and getattr(tokenizer, "chat_template", None))
    prompts = [build_prompt(tokenizer, e.text, data_cfg) for e in splits.eval]
    answers = generate_greedy(generate, tokenizer, prompts, chat, eval_cfg.max_new_tokens, eval_cfg.batch_size, desc)
    refs = [e.answers for e in splits.eval]
    em = [exact_match(a, r) for a, r in zip(answers, refs)]
    f1 = [token_f1(a, r) for a, r in zip(answers, refs)]
    return {"exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1), "predictions": answers,
            "per_example": {"exact_match": em, "f1": f1}}


def agreement(predictions: list[str], reference: list[str]) -> float:
    """Fraction of examples where two models predict the same label."""
    return sum(p == r for p, r in zip(predictions, reference)) / len(reference)


def perplexity_blocks(tokenizer, texts: list[str], blocks: int, block_tokens: int) -> list[list[int]]:
    """The texts as one token stream (EOS between texts), cut into up to `blocks` blocks."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(stream) >= blocks * block_tokens:
            break
    return [stream[i: i + block_tokens] for i in range(0, min(len(stream), blocks * block_tokens), block_tokens)
            if len(stream[i: i + block_tokens]) > 1]


def perplexity(logits_fn: LogitsFn, blocks: list[list[int]], batch_size: int, pad_id: int,
               desc: str = "perplexity") -> float:
    """exp(mean negative log-likelihood of every token after the first, over all blocks)."""
    nll, count = 0.0, 0
    with progress() as bar:
        task = bar.add_task(desc, total=len(blocks))
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start: start + batch_size]
            ids, mask = pad(batch, pad_id)
            logits = logits_fn(ids, mask, None)[:, :-1].float()  # (B, T-1, V)
            target = ids[:, 1:].to(logits.device)  # (B, T-1)
            keep = mask[:, 1:].bool().to(logits.device)
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll += losses[keep].sum().item()
            count += int(keep.sum())
            bar.advance(task, len(batch))
    return math.exp(nll / count)


# --------------------------------------------------------------------------- latency, memory, size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(model, prompt_ids: list[int], decode_tokens: int, warmup: int, runs: int) -> dict:
    """Prefill ms for the prompt and greedy decode tokens/s after it (batch 1, KV cache): medians."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)

    def prefill():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        _sync(device)
        return out, time.perf_counter() - t0

    def decode() -> float:
        out, _ = prefill()
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (1, 1)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return decode_tokens / (time.perf_counter() - t0)

    for _ in range(warmup):
        decode()
    prefill_s = statistics.median(prefill()[1] for _ in range(runs))
    tok_s = statistics.median(decode() for _ in range(runs))
    return {"prefill_ms": prefill_s * 1000, "decode_tok_s": tok_s}


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS so the next model's RSS is not hidden by reuse."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose `peak_mem_mb` is set on exit: memory added at peak inside the block.

    CUDA: peak allocated by torch. CPU: peak resident set size (sampled every 5 ms) above
    the resident size on entry, so it counts what loading and running the model added.
    """
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        result["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    _release_freed_memory()
    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result["peak_mem_mb"] = max(0, peak[0] - base) / 2**20


def weights_size_mb(folder: Path) -> float:
    """Bytes on disk of the weight files in a model folder, in MiB."""
    suffixes = (".safetensors", ".bin", ".pt", ".onnx", ".onnx_data", ".onnx.data", ".gguf")
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes)) / 2**20


def count_params(model) -> int:
    """Parameters, counting tied (shared) tensors once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


# --------------------------------------------------------------------------- one model


def evaluate_torch(model, tokenizer, splits, data_cfg, eval_cfg, reference: list[str] | None,
                   name: str) -> dict:
    """Every enabled measurement of one PyTorch model: a results record plus `predictions`."""

    def latency(prompt: list[int], decode_tokens: int, warmup: int, runs: int) -> dict:
        return measure_latency(model, prompt, decode_tokens, warmup, runs)

    record = {"params": count_params(model)}
    generate = torch_generate_fn(model, tokenizer.pad_token_id, eos_ids(tokenizer, model.generation_config))
    return {**record, **evaluate_fns(torch_logits_fn(model), latency, tokenizer, splits, data_cfg, eval_cfg,
                                     reference, name, generate)}


LatencyFn = Callable[[list[int], int, int, int], dict]
"""(prompt ids, decode tokens, warm-up runs, timed runs) -> {"prefill_ms", "decode_tok_s"}."""


def evaluate_fns(fn: LogitsFn, latency: LatencyFn | None, tokenizer, splits, data_cfg, eval_cfg,
                 reference: list[str] | None, name: str, generate: GenerateFn | None = None) -> dict:
    """Every enabled measurement of one model given as a logits function, a latency function and, for
    generative tasks, a generate function with a KV cache (any backend: PyTorch, ONNX Runtime, ...; without
    one, generation runs on the logits function): a results record plus `predictions`. The record's
    `example_scores` are each eval example's score on the primary metric, in eval order."""
    record: dict = {}
    if eval_cfg.accuracy and splits.generative:
        generate = generate or logits_generate_fn(fn, tokenizer.pad_token_id, eos_ids(tokenizer))
        scored = score_generation(generate, tokenizer, splits, data_cfg, eval_cfg, f"{name}: answers")
        record.update(exact_match=scored["exact_match"], f1=scored["f1"], predictions=scored["predictions"],
                      metric=data_cfg.metric)
        if reference is not None:  # F1 of its answers against the teacher's own
            pairs = zip(scored["predictions"], reference)
            record["agreement"] = sum(token_f1(p, [r]) for p, r in pairs) / len(reference)
    elif eval_cfg.accuracy and splits.labelled:
        scored = score_accuracy(fn, tokenizer, splits, data_cfg, eval_cfg.batch_size, f"{name}: accuracy")
        record["accuracy"] = scored["accuracy"]
        record["predictions"] = scored["predictions"]
        if reference is not None:
            record["agreement"] = agreement(scored["predictions"], reference)
    if eval_cfg.accuracy and (splits.generative or splits.labelled):
        record["example_scores"] = compact(scored["per_example"][record.get("metric", "accuracy")])
    blocks = perplexity_blocks(tokenizer, splits.perplexity, eval_cfg.perplexity_blocks,
                               eval_cfg.perplexity_block_tokens)
    if eval_cfg.perplexity:
        record["perplexity"] = perplexity(fn, blocks, eval_cfg.batch_size, tokenizer.pad_token_id,
                                          f"{name}: perplexity")
    if eval_cfg.latency and latency is not None:
        record.update(latency(latency_prompt(tokenizer, blocks, eval_cfg.prefill_tokens), eval_cfg.decode_tokens,
                              eval_cfg.warmup_runs, eval_cfg.latency_runs))
    return record


def compact(scores: list[float]) -> list[float]:
    """Per-example scores as results.json keeps them: whole numbers as ints, others to 4 decimals."""
    return [int(x) if float(x).is_integer() else round(x, 4) for x in scores]


def latency_prompt(tokenizer, blocks: list[list[int]], tokens: int) -> list[int]:
    """A `tokens`-long prompt of held-out text (repeated if the text is short)."""
    stream = [t for b in blocks for t in b] or [tokenizer.eos_token_id]
    return (stream * (tokens // len(stream) + 1))[:tokens]
