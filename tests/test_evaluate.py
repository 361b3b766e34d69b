import math

import torch

from compress.data import Example, Splits
from compress.evaluate import (agreement, build_prompt, choice_logprobs, count_params, encode_requests,
                               measure_latency, perplexity, perplexity_blocks, score_accuracy, torch_logits_fn)


def _reference_logprob(model, ctx, cont):
    """-loss * n from transformers' own loss with the context masked (-100)."""
    ids = torch.tensor([ctx + cont])
    labels = torch.tensor([[-100] * len(ctx) + cont])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return -loss.item() * len(cont)


def test_choice_logprobs_match_a_plain_reference(tiny_teacher):
    _, model, tok = tiny_teacher
    prompts = ["Review: fine film.\nThe sentiment is", "Review: a dud, frankly.\nThe sentiment is"]
    requests = encode_requests(tok, prompts, [" positive", " negative"], chat=False)
    assert all(len(cont) > 1 for _, conts in requests for cont in conts)  # byte tokens: multi-token path
    scores = choice_logprobs(torch_logits_fn(model), requests, batch_size=3, pad_id=tok.pad_token_id)
    for i, (ctx, conts) in enumerate(requests):
        for j, cont in enumerate(conts):
            assert math.isclose(scores[i, j].item(), _reference_logprob(model, ctx, cont), rel_tol=1e-4, abs_tol=1e-4)


def test_single_token_fast_path_matches_the_general_path(tiny_teacher):
    _, model, tok = tiny_teacher
    requests = [(tok("abc")["input_ids"], [[10], [20], [30]]), (tok("de")["input_ids"], [[10], [20], [30]])]
    fast = choice_logprobs(torch_logits_fn(model), requests, batch_size=2, pad_id=tok.pad_token_id)
    slow = torch.tensor([[_reference_logprob(model, ctx, c) for c in conts] for ctx, conts in requests])
    assert torch.allclose(fast, slow, atol=1e-4)


def test_padding_does_not_change_scores(tiny_teacher):
    _, model, tok = tiny_teacher
    requests = encode_requests(tok, ["short", "a much longer prompt than the first"], [" yes", " no"], chat=False)
    batched = choice_logprobs(torch_logits_fn(model), requests, batch_size=2, pad_id=tok.pad_token_id)
    alone = torch.cat([choice_logprobs(torch_logits_fn(model), [r], 1, tok.pad_token_id) for r in requests])
    assert torch.allclose(batched, alone, atol=1e-4)


def test_perplexity_matches_transformers_loss(tiny_teacher):
    _, model, tok = tiny_teacher
    blocks = perplexity_blocks(tok, ["the quick brown fox " * 20, "jumps over the lazy dog " * 20], 4, 32)
    assert len(blocks) == 4 and all(len(b) == 32 for b in blocks)
    ours = perplexity(torch_logits_fn(model), blocks, batch_size=3, pad_id=tok.pad_token_id)
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in blocks]
    assert math.isclose(ours, math.exp(sum(losses) / len(losses)), rel_tol=1e-4)


def test_accuracy_and_agreement_on_real_reviews(tiny_teacher, tiny_cfg):
    _, model, tok = tiny_teacher
    splits = Splits(train=[], unlabeled=[], eval=[Example("great", "fresh"), Example("awful", "rotten")] * 3,
                    perplexity=[], verbalizers={"fresh": " positive", "rotten": " negative"})
    out = score_accuracy(torch_logits_fn(model), tok, splits, tiny_cfg.data, batch_size=4)
    assert len(out["predictions"]) == 6 and set(out["predictions"]) <= {"fresh", "rotten"}
    gold = [e.label for e in splits.eval]
    assert out["accuracy"] == agreement(out["predictions"], gold)
    assert agreement(["a", "b", "a"], ["a", "a", "a"]) == 2 / 3


def test_prompt_uses_the_chat_template(tiny_teacher, tiny_cfg):
    _, _, tok = tiny_teacher
    prompt = build_prompt(tok, "A fine film.", tiny_cfg.data)
    assert prompt.startswith("<|im_start|>user\nReview: A fine film.") and prompt.endswith(
        "<|im_start|>assistant\nThe sentiment is")


def test_latency_is_measured(tiny_teacher):
    _, model, _ = tiny_teacher
    lat = measure_latency(model, list(range(3, 19)), decode_tokens=8, warmup=1, runs=2)
    assert lat["prefill_ms"] > 0 and lat["decode_tok_s"] > 0


def test_tied_parameters_count_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert count_params(model) < sum(p.numel() for p in model.state_dict().values())
