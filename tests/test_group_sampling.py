"""Group sampling: `generate(..., num_samples=n)` runs each prompt once and samples n responses
from its copied KV cache, with the results of generating the repeated prompts."""

from __future__ import annotations

import pytest
import torch
from tiny_tokenizer import make_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from ppo_rlhf.generation import generate
from ppo_rlhf.models import load_causal_lm

TOK = make_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id


def build(name: str):
    """Presets take the GPT-2 / Llama fast decoders; qwen3 (q/k norms) the model's own forward."""
    if name != "qwen3":
        return load_causal_lm(name, TOK, seed=0).eval()
    config = AutoConfig.for_model(
        "qwen3", vocab_size=len(TOK), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=TOK.bos_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama", "qwen3"])
def policy(request):
    return build(request.param)


def prompts(lengths=(6, 3, 1, 5), width=6):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(TOK), (len(lengths), width), generator=gen)
    mask = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]
    return ids.masked_fill(~mask, PAD), mask


def sample(policy, ids, mask, **kw):
    kw = {"max_new_tokens": 8, "eos_token_id": EOS, "pad_token_id": PAD, "temperature": 1.0,
          "return_logprobs": True, "return_entropy": True, **kw}
    return generate(policy, ids, mask, **kw)


@pytest.mark.parametrize("n", [1, 3])
def test_group_samples_equal_the_repeated_prompts_with_the_same_row_seeds(policy, n):
    ids, mask = prompts()
    seeds = [100 + i for i in range(len(ids) * n)]
    group = sample(policy, ids, mask, num_samples=n, row_seeds=seeds)
    repeated = sample(policy, ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), row_seeds=seeds)
    assert group[0].shape[0] == len(ids) * n
    assert torch.equal(group[0], repeated[0]) and torch.equal(group[1], repeated[1])
    torch.testing.assert_close(group[2], repeated[2], rtol=0, atol=1e-5)  # log-probs
    torch.testing.assert_close(group[3], repeated[3], rtol=0, atol=1e-5)  # entropies


def test_group_samples_equal_the_repeated_prompts_with_one_generator(policy):
    ids, mask = prompts()
    group = sample(policy, ids, mask, num_samples=2, generator=torch.Generator().manual_seed(5))
    repeated = sample(policy, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0),
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(group[0], repeated[0])


def test_the_samples_of_a_prompt_differ_and_greedy_ones_agree(policy):
    ids, mask = prompts()
    n = 4
    sampled = sample(policy, ids, mask, num_samples=n, row_seeds=list(range(len(ids) * n)))[0]
    per_prompt = sampled.view(len(ids), n, -1)
    assert any(not torch.equal(group[0], group[j]) for group in per_prompt for j in range(1, n))
    greedy = sample(policy, ids, mask, num_samples=n, temperature=0.0)[0].view(len(ids), n, -1)
    assert all(torch.equal(group[0], group[j]) for group in greedy for j in range(1, n))


def test_each_prompt_runs_through_the_model_once(policy):
    """The prefill sees B rows; only the decoding steps see B * n."""
    ids, mask = prompts()
    shapes = []
    embedding = policy.get_input_embeddings()
    handle = embedding.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        sample(policy, ids, mask, num_samples=3, row_seeds=list(range(len(ids) * 3)), eos_token_id=None)
    finally:
        handle.remove()
    assert shapes[0] == tuple(ids.shape)
    assert shapes[1:] == [(len(ids) * 3, 1)] * 7


def test_row_seeds_must_cover_every_sample():
    policy = build("tiny-gpt2")
    ids, mask = prompts()
    with pytest.raises(ValueError, match="num_samples=2"):
        sample(policy, ids, mask, num_samples=2, row_seeds=list(range(len(ids))))
    with pytest.raises(ValueError, match="at least 1"):
        sample(policy, ids, mask, num_samples=0)
