"""Tests for ppo_rlhf.generation: sampling against HF generate, scoring against naive forwards."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import transformers
from tiny_tokenizer import make_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from ppo_rlhf import generation
from ppo_rlhf.errors import UserError
from ppo_rlhf.generation import (
    _decoder_class,
    _GPT2Decoder,
    _HFDecoder,
    _LlamaDecoder,
    cache_keyword,
    generate,
    response_logprobs,
    response_values,
    sample_tokens,
    sequence_rewards,
    truncate_logits,
)
from ppo_rlhf.models import (
    adapters_disabled,
    apply_lora,
    load_causal_lm,
    load_scalar_model,
    set_reward_normalisation,
    token_scores,
)

PAD, EOS = 0, 1


TOK = make_tokenizer()


# Families decoded through the model's own forward (`_HFDecoder`), built locally with random weights:
# Mistral (sliding-window cache layers), Qwen3 (q/k norms), Gemma (scaled embeddings, GeGLU),
# Phi (LayerNorm, partial rotary, biased projections), Phi-3 (fused QKV).
GENERIC_FAMILIES = ["mistral", "qwen3", "gemma", "phi", "phi3"]


def small_model(model_type: str) -> AutoModelForCausalLM:
    """qwen2 (biased q/k/v) takes the Llama fast path; GENERIC_FAMILIES the model's own forward."""
    config = AutoConfig.for_model(
        model_type, vocab_size=len(TOK), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama", "qwen2", *GENERIC_FAMILIES])
def policy(request):
    if request.param.startswith("tiny-"):
        return load_causal_lm(request.param, TOK, seed=0).eval()
    return small_model(request.param).eval()


TRANSFORMERS = tuple(int(x) for x in transformers.__version__.split(".")[:2])


def test_decoder_choice():
    gpt2 = load_causal_lm("tiny-gpt2", TOK).base_model
    # transformers 5.0 has no GPT2Attention.scaling: GPT-2 then decodes through its own forward.
    fast_gpt2 = hasattr(gpt2.h[0].attn, "scaling")
    assert _decoder_class(gpt2) is (_GPT2Decoder if fast_gpt2 else _HFDecoder)
    assert fast_gpt2 or TRANSFORMERS < (5, 24)
    assert _decoder_class(load_causal_lm("tiny-llama", TOK).base_model) is _LlamaDecoder
    assert _decoder_class(small_model("qwen2").base_model) is _LlamaDecoder
    for family in GENERIC_FAMILIES:
        assert _decoder_class(small_model(family).base_model) is _HFDecoder, family


def test_cache_keyword_follows_the_forward_signature():
    def new(input_ids=None, cache=None, **kwargs): ...
    def old(input_ids=None, past_key_values=None, **kwargs): ...
    def none(input_ids=None, **kwargs): ...

    @functools.wraps(old)
    def decorated(*args, **kwargs):
        return old(*args, **kwargs)

    assert cache_keyword(new) == "cache" and cache_keyword(old) == "past_key_values"
    assert cache_keyword(decorated) == "past_key_values"
    with pytest.raises(UserError, match="takes no KV cache"):
        cache_keyword(none)
    # transformers renamed past_key_values to cache in 5.24
    expected = "cache" if TRANSFORMERS >= (5, 24) else "past_key_values"
    for family in GENERIC_FAMILIES:
        assert cache_keyword(small_model(family).base_model.forward) == expected, family


def test_a_cache_the_forward_ignores_is_an_error_not_context_free_decoding(monkeypatch):
    """The transformers 5.0-5.23 defect: `cache=` vanished into **kwargs and each step after the
    prompt ran without context. A keyword the forward swallows must stop generation."""
    model = small_model("mistral").eval()
    monkeypatch.setattr(generation, "cache_keyword", lambda forward: "swallowed_by_kwargs")
    ids, mask = prompts()
    with pytest.raises(RuntimeError, match=r"after the 7-token prompt the KV cache .* holds 0 "
                                           r"positions, not 7"):
        generate(model, ids, mask, max_new_tokens=3, eos_token_id=None, pad_token_id=PAD,
                 temperature=0)


def prompts(lengths=(7, 5, 3, 1, 6, 2), width=7, seed=0):
    """(B, P) left-padded random prompts with the given lengths and their bool mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(TOK), (len(lengths), width), generator=gen)
    mask = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]
    return ids.masked_fill(~mask, PAD), mask


def hf_greedy(model, ids, mask, max_new_tokens, eos):
    out = model.generate(
        input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=PAD,
    )
    return out[:, ids.shape[1] :]


def kept_tokens(logits: list[float], top_k: int, top_p: float) -> list[int]:
    """Plain-Python top-k then top-p: the token ids sampling keeps, most likely first."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if 0 < top_k < len(logits):
        order = [i for i in order if logits[i] >= logits[order[top_k - 1]]]  # ties stay
    z = sum(math.exp(logits[i]) for i in order)
    kept, mass = [], 0.0
    for i in order:
        if kept and mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(logits[i]) / z
    return kept


def naive_truncated_logprobs(model, sequences, mask, prompt_len, temperature, top_k, top_p):
    """Log-prob of each response token under softmax over the kept tokens only, position by
    position from a plain forward's logits; and (sum over kept tokens of p) per position."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits.double()
    logits = logits[:, prompt_len - 1 : -1] / temperature
    out = torch.zeros(logits.shape[:2], dtype=torch.float64)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not mask[b, prompt_len + t]:
                continue
            row = logits[b, t].tolist()
            kept = kept_tokens(row, top_k, top_p)
            token = int(sequences[b, prompt_len + t])
            assert token in kept, "the sampler drew a token outside the truncated distribution"
            log_z = math.log(sum(math.exp(row[i]) for i in kept))
            out[b, t] = row[token] - log_z
    return out.float()


def naive_logprobs(model, sequences, mask, prompt_len, temperature):
    """log_softmax(logits / T) at the response tokens from the full logits, and the entropy."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits.float()
    logp = torch.log_softmax(logits[:, prompt_len - 1 : -1] / temperature, -1)
    chosen = logp.gather(-1, sequences[:, prompt_len:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    response_mask = mask[:, prompt_len:]
    return chosen * response_mask, entropy * response_mask


# ---------------------------------------------------------------------------------------------
# generate


def test_greedy_equals_hf_generate(policy):
    ids, mask = prompts()
    ours, ours_mask = generate(policy, ids, mask, max_new_tokens=12, eos_token_id=None,
                               pad_token_id=PAD, temperature=0)
    assert torch.equal(ours, hf_greedy(policy, ids, mask, 12, eos=None))
    assert ours_mask.all()
    # With an EOS that greedy decoding produces mid-way in some rows: same stops and padding.
    eos = int(ours[0, 3])
    ours, ours_mask = generate(policy, ids, mask, max_new_tokens=12, eos_token_id=eos,
                               pad_token_id=PAD, temperature=0)
    assert torch.equal(ours, hf_greedy(policy, ids, mask, 12, eos=eos))


def test_eos_keeps_eos_then_pads_and_masks(policy):
    ids, mask = prompts()
    greedy, _ = generate(policy, ids, mask, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD,
                         temperature=0)
    eos = [int(greedy[0, 2]), int(greedy[1, 4])]  # several stop ids are allowed
    response, response_mask = generate(policy, ids, mask, max_new_tokens=10, eos_token_id=eos,
                                       pad_token_id=PAD, temperature=0)
    assert response_mask.dtype == torch.bool and response.shape == response_mask.shape
    for row, row_mask, full in zip(response, response_mask, greedy, strict=True):
        stops = [t for t in range(10) if int(full[t]) in eos]
        length = stops[0] + 1 if stops else 10
        assert row_mask.tolist() == [True] * length + [False] * (response.shape[1] - length)
        assert row[:length].tolist() == full[:length].tolist()  # the EOS itself is kept
        assert (row[length:] == PAD).all()
    assert response.shape[1] == int(response_mask.sum(1).max())


def test_stops_early_when_every_row_finished(policy):
    ids, mask = prompts()
    greedy, _ = generate(policy, ids, mask, max_new_tokens=8, eos_token_id=None, pad_token_id=PAD,
                         temperature=0)
    eos = greedy[:, :3].flatten().tolist()  # every row emits one of these within 3 tokens
    response, response_mask = generate(policy, ids, mask, max_new_tokens=8, eos_token_id=eos,
                                       pad_token_id=PAD, temperature=0)
    assert response.shape[1] <= 3 and response_mask[:, 0].all()


def test_sampling_is_deterministic_given_the_generator(policy):
    ids, mask = prompts()

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(policy, ids, mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD,
                        temperature=1.0, top_k=20, top_p=0.9, generator=gen)

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 0.8), (1.0, 0, 0.6),
                                                     (0.9, 3, 1.0)])
def test_sampled_logprobs_match_scoring(policy, temperature, top_k, top_p):
    ids, mask = prompts()
    gen = torch.Generator().manual_seed(0)
    response, response_mask, sampled, sampled_entropy = generate(
        policy, ids, mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=gen, return_logprobs=True,
        return_entropy=True,
    )
    sequences = torch.cat([ids, response], 1)
    full_mask = torch.cat([mask, response_mask], 1)
    # Both of the distribution actually sampled: softmax(logits / T) truncated by top-k / top-p
    # and renormalised over the kept tokens (issue 13, defect 7: training stays on-policy).
    scored, entropy = response_logprobs(policy, sequences, full_mask, ids.shape[1],
                                        temperature=temperature, top_k=top_k, top_p=top_p,
                                        with_entropy=True)
    assert torch.allclose(sampled, scored, atol=1e-5)
    assert torch.allclose(sampled_entropy, entropy, atol=1e-5)
    assert (sampled[~response_mask] == 0).all() and (sampled_entropy[~response_mask] == 0).all()
    naive = naive_truncated_logprobs(policy, sequences, full_mask, ids.shape[1], temperature, top_k,
                                     top_p)
    assert torch.allclose(sampled, naive, atol=1e-5)
    if top_k or top_p < 1:  # the full softmax would give other (lower) log-probs
        full, _ = response_logprobs(policy, sequences, full_mask, ids.shape[1], temperature=temperature)
        assert (sampled - full)[response_mask].min() > 1e-3


def test_only_an_amd_cpu_decodes_small_batches_on_one_thread():
    from ppo_rlhf.generation import _ONE_THREAD_DECODE, one_thread_decode

    cpu = torch.device("cpu")
    assert one_thread_decode(cpu, 64, 128, vendor="AuthenticAMD")
    assert not one_thread_decode(cpu, 64, 128, vendor="GenuineIntel")  # MKL's second thread pays there
    assert not one_thread_decode(cpu, 64, 128, vendor="")  # unknown: torch's own thread count
    assert not one_thread_decode(cpu, _ONE_THREAD_DECODE // 128 + 1, 128, vendor="AuthenticAMD")
    assert not one_thread_decode(torch.device("meta"), 1, 1, vendor="AuthenticAMD")


def test_decoding_on_one_thread_restores_the_thread_count(policy, monkeypatch):
    import ppo_rlhf.precision

    monkeypatch.setattr(ppo_rlhf.precision, "cpu_vendor", lambda: "AuthenticAMD")
    ids, mask = prompts()  # batch x hidden size is small: decoded on one thread (an AMD CPU)
    seen = []
    hook = policy.get_output_embeddings().register_forward_hook(
        lambda *_: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate(policy, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=PAD,
                 temperature=0)
        assert seen == [1] * 4 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        hook.remove()


def test_generate_restores_train_mode_and_turns_dropout_off():
    model = load_causal_lm("tiny-gpt2", TOK, dropout=0.5).train()
    ids, mask = prompts()
    settings = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=PAD, temperature=0)
    a, _ = generate(model, ids, mask, **settings)
    b, _ = generate(model, ids, mask, **settings)
    assert torch.equal(a, b) and model.training and all(m.training for m in model.modules())


def test_generate_with_lora_and_adapters_disabled():
    base = load_causal_lm("tiny-llama", TOK, seed=0).eval()
    ids, mask = prompts()
    expected, _ = generate(base, ids, mask, max_new_tokens=8, eos_token_id=None, pad_token_id=PAD,
                           temperature=0)
    model = apply_lora(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1.0)
    adapted, _ = generate(model, ids, mask, max_new_tokens=8, eos_token_id=None, pad_token_id=PAD,
                          temperature=0)
    assert not torch.equal(adapted, expected)
    with adapters_disabled(model):
        disabled, _ = generate(model, ids, mask, max_new_tokens=8, eos_token_id=None,
                               pad_token_id=PAD, temperature=0)
    assert torch.equal(disabled, expected)


def test_prompt_plus_response_longer_than_gpt2_context_is_a_user_error():
    model = load_causal_lm("tiny-gpt2", TOK)  # 128 positions
    ids, mask = prompts()
    with pytest.raises(UserError, match="135 tokens, more than the model's 128-token context"):
        generate(model, ids, mask, max_new_tokens=128, eos_token_id=EOS, pad_token_id=PAD)


def test_models_that_transform_their_logits_are_refused():
    model = load_causal_lm("tiny-llama", TOK)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 does
    ids, mask = prompts()
    with pytest.raises(UserError, match="final_logit_softcapping=30.0"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(UserError, match="transform their logits"):
        response_logprobs(model, ids, mask, 4)


# ---------------------------------------------------------------------------------------------
# sample_tokens


def test_sample_tokens_greedy_top_k_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    assert sample_tokens(logits, temperature=0).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_tokens(logits, top_k=2, generator=gen) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    top1 = sample_tokens(logits.repeat(50, 1), top_k=1, generator=gen)
    assert (top1 == logits.argmax(-1).repeat(50)).all()
    # Row 0 probabilities ~ [.03, .64, .09, .24]: top_p 0.7 keeps {1, 3}; 0.5 keeps {1}.
    draws = torch.stack([sample_tokens(logits[:1], top_p=0.7, generator=gen) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 3}
    assert (sample_tokens(logits[:1].repeat(100, 1), top_p=0.5, generator=gen) == 1).all()


def test_truncate_logits_keeps_top_k_then_top_p_of_the_renormalised_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])  # probabilities ~ [.03, .64, .09, .24]
    inf = float("-inf")

    def kept(**kw):
        out = truncate_logits(logits, **kw)
        return [i for i in range(4) if out[0, i] > inf]

    assert truncate_logits(logits) is logits  # no filter: the logits themselves
    assert kept(top_k=2) == [1, 3] and kept(top_k=4) == [0, 1, 2, 3]
    assert kept(top_p=0.7) == [1, 3] and kept(top_p=0.5) == [1] and kept(top_p=0.0) == [1]
    # top-3 renormalised: [.665, .245, .090] for tokens 1, 3, 2; the mass before token 2 is .910
    assert kept(top_k=3, top_p=0.9) == [1, 3] and kept(top_k=3, top_p=0.92) == [1, 2, 3]
    assert torch.equal(truncate_logits(logits, top_k=2)[0, [1, 3]], logits[0, [1, 3]])
    # `keep` re-admits the sampled token whatever its rank (scoring passes the sampled ids)
    out = truncate_logits(logits.repeat(2, 1), top_k=1, keep=torch.tensor([2, 1]))
    assert (out > inf).tolist() == [[False, True, True, False], [False, True, False, False]]
    ties = truncate_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1)
    assert (ties > inf).tolist() == [[False, True, True, False]]  # ties with the k-th stay
    for top_k, top_p in [(2, 1.0), (0, 0.7), (3, 0.9), (3, 0.92)]:
        assert kept(top_k=top_k, top_p=top_p) == sorted(kept_tokens(logits[0].tolist(), top_k, top_p))


def test_truncated_logprobs_are_differentiable_and_finite():
    policy = load_causal_lm("tiny-llama", TOK, seed=0)
    ids, mask = prompts()
    response, response_mask = generate(policy, ids, mask, max_new_tokens=6, eos_token_id=EOS,
                                       pad_token_id=PAD, temperature=1.0, top_k=4, top_p=0.8,
                                       generator=torch.Generator().manual_seed(0))
    sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    logprobs, entropy = response_logprobs(policy, sequences, full_mask, ids.shape[1], top_k=4,
                                          top_p=0.8, with_entropy=True, chunk_size=5)
    (logprobs.sum() + entropy.sum()).backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()


def test_sample_tokens_frequencies_follow_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, float("-inf")])
    gen = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits.repeat(40_000, 1), temperature=2.0, generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logits / 2.0, -1), atol=0.01)
    assert freq[4] == 0  # a zero-probability token is never drawn


# ---------------------------------------------------------------------------------------------
# Scoring


def test_response_logprobs_and_entropy_equal_naive(policy):
    ids, mask = prompts()
    gen = torch.Generator().manual_seed(3)
    response, response_mask = generate(policy, ids, mask, max_new_tokens=9, eos_token_id=EOS,
                                       pad_token_id=PAD, generator=gen)
    sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    expected_lp, expected_ent = naive_logprobs(policy, sequences, full_mask, ids.shape[1], 0.8)
    for chunk_size in (None, 5):
        lp, ent = response_logprobs(policy, sequences, full_mask, ids.shape[1], temperature=0.8,
                                    with_entropy=True, chunk_size=chunk_size)
        assert lp.shape == ent.shape == response.shape and lp.dtype == torch.float32
        assert torch.allclose(lp, expected_lp, atol=1e-5)
        assert torch.allclose(ent, expected_ent, atol=1e-5)
    assert response_logprobs(policy, sequences, full_mask, ids.shape[1])[1] is None


def test_response_logprobs_do_not_depend_on_padding():
    model = load_causal_lm("tiny-gpt2", TOK, seed=1).eval()  # GPT-2: absolute positions
    ids, mask = prompts(lengths=(4, 2), width=4)
    response = torch.tensor([[5, 6, 7], [8, EOS, PAD]])
    response_mask = torch.tensor([[True, True, True], [True, True, False]])
    sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    batched, _ = response_logprobs(model, sequences, full_mask, 4)
    assert torch.isfinite(batched).all()
    # Row 1 alone, without its 2 pad tokens: same log-probs.
    alone, _ = response_logprobs(model, sequences[1:, 2:], full_mask[1:, 2:], 2)
    assert torch.allclose(batched[1:], alone, atol=1e-5)


def test_response_logprobs_gradients_match_naive_with_chunks():
    model = load_causal_lm("tiny-llama", TOK, seed=2)
    ids, mask = prompts()
    gen = torch.Generator().manual_seed(0)
    response, response_mask = generate(model, ids, mask, max_new_tokens=6, eos_token_id=EOS,
                                       pad_token_id=PAD, generator=gen)
    sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)

    def grads(fn):
        model.zero_grad()
        lp, ent = fn()
        (lp.sum() + 0.1 * ent.sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    naive = grads(lambda: naive_logprobs(model, sequences, full_mask, ids.shape[1], 0.7))
    chunked = grads(lambda: response_logprobs(model, sequences, full_mask, ids.shape[1],
                                              temperature=0.7, with_entropy=True, chunk_size=4))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(naive, chunked, strict=True))


def test_lora_reference_logprobs_equal_base_model():
    base = load_causal_lm("tiny-gpt2", TOK, seed=0).eval()
    ids, mask = prompts()
    gen = torch.Generator().manual_seed(0)
    response, response_mask = generate(base, ids, mask, max_new_tokens=6, eos_token_id=EOS,
                                       pad_token_id=PAD, generator=gen)
    sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    expected, _ = response_logprobs(base, sequences, full_mask, ids.shape[1])
    model = apply_lora(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    adapted, _ = response_logprobs(model, sequences, full_mask, ids.shape[1])
    assert not torch.allclose(adapted, expected)
    naive, _ = naive_logprobs(model, sequences, full_mask, ids.shape[1], 1.0)
    assert torch.allclose(adapted, naive, atol=1e-5)
    with adapters_disabled(model):
        reference, _ = response_logprobs(model, sequences, full_mask, ids.shape[1])
    assert torch.allclose(reference, expected, atol=1e-6)


def test_response_values_are_the_states_before_each_response_token():
    value_model = load_scalar_model("tiny-llama", TOK, init_from_causal_lm=True, head_init_std=0.5)
    ids, mask = prompts(lengths=(5, 3), width=5)
    response = torch.tensor([[5, 6, EOS], [7, PAD, PAD]])
    response_mask = torch.tensor([[True, True, True], [True, False, False]])
    sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    values = response_values(value_model, sequences, full_mask, prompt_len=5)
    scores = token_scores(value_model, sequences, full_mask)
    assert values.shape == (2, 3) and values.dtype == torch.float32
    assert torch.equal(values[0], scores[0, 4:7])  # V(prompt), V(prompt + 5), V(prompt + 5 6)
    assert values[1, 0] == scores[1, 4] and (values[1, 1:] == 0).all()


def test_sequence_rewards_use_the_last_real_token_and_normalisation():
    reward_model = load_scalar_model("tiny-gpt2", TOK, init_from_causal_lm=True, head_init_std=0.5)
    ids, mask = prompts(lengths=(5, 3), width=5)
    response = torch.tensor([[5, 6, EOS], [7, PAD, PAD]])
    response_mask = torch.tensor([[True, True, True], [True, False, False]])
    sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    scores = token_scores(reward_model, sequences, full_mask)
    raw = torch.stack([scores[0, 7], scores[1, 5]])
    assert torch.allclose(sequence_rewards(reward_model, sequences, full_mask), raw)
    set_reward_normalisation(reward_model, torch.tensor([1.0, 3.0]))  # gain 1, bias -2
    assert torch.allclose(sequence_rewards(reward_model, sequences, full_mask), raw - 2.0)


def test_ddp_wrapped_models_are_scored_through_the_wrapper(tmp_path):
    """DDP synchronises gradients only for a forward through the wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    policy = load_causal_lm("tiny-gpt2", TOK, seed=0)
    value_model = load_scalar_model("tiny-gpt2", TOK, init_from_causal_lm=True, head_init_std=0.1)
    ids, mask = prompts()
    gen = torch.Generator().manual_seed(0)
    response, response_mask = generate(policy, ids, mask, max_new_tokens=5, eos_token_id=EOS,
                                       pad_token_id=PAD, generator=gen)
    sequences, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)

    def loss_and_grads(pol, val):
        for m in (policy, value_model):
            m.zero_grad()
        lp, _ = response_logprobs(pol, sequences, full_mask, ids.shape[1])
        loss = lp.sum() + response_values(val, sequences, full_mask, ids.shape[1]).sum()
        loss.backward()
        return [p.grad.clone() for m in (policy, value_model) for p in m.parameters()]

    expected = loss_and_grads(policy, value_model)
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        wrapped = [DistributedDataParallel(policy), DistributedDataParallel(value_model)]
        calls = []
        for ddp in wrapped:
            ddp.register_forward_pre_hook(lambda *_: calls.append(1))
        got = loss_and_grads(*wrapped)
        assert len(calls) == 2
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, got, strict=True))
        again, _ = generate(wrapped[0], ids, mask, max_new_tokens=5, eos_token_id=EOS,
                            pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
        assert torch.equal(again, response)
    finally:
        dist.destroy_process_group()
