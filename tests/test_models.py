"""Tests for ppo_rlhf.models: presets, loading, scalar heads, normalisation, saving, LoRA."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny_tokenizer import make_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
)

from ppo_rlhf.errors import UserError
from ppo_rlhf.models import (
    MODEL_PRESETS,
    adapters_disabled,
    apply_lora,
    check_same_tokenizer,
    count_parameters,
    disable_dropout,
    fold_reward_normalisation,
    load_causal_lm,
    load_scalar_model,
    save_model,
    sequence_scores,
    set_reward_normalisation,
    token_scores,
    vocab_sha256,
)

PAD, EOS, BOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def left_padded(lengths: list[int], width: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), width), generator=gen)
    mask = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]
    return ids.masked_fill(~mask, PAD), mask


# ---------------------------------------------------------------------------------------------
# Building and loading


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "small-gpt2"])
def test_presets_take_vocab_and_special_ids_from_tokenizer(tok, name):
    model = load_causal_lm(name, tok)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    config = model.config
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (PAD, EOS, BOS)
    ids, mask = left_padded([5, 3], 5, len(tok))
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 5, len(tok))


def test_preset_shapes(tok):
    gpt2 = load_causal_lm("tiny-gpt2", tok).config
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.n_positions) == (2, 128, 4, 128)
    llama = load_causal_lm("tiny-llama", tok).config
    assert (llama.num_hidden_layers, llama.hidden_size, llama.num_attention_heads) == (2, 128, 4)
    assert llama.num_key_value_heads == 2 and llama.intermediate_size == 256
    assert llama.max_position_embeddings == 128
    assert MODEL_PRESETS["qwen-0.5b-like"]["model_type"] == "qwen2"


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_causal_lm("tiny-gpt2", tok, seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    b = load_causal_lm("tiny-gpt2", tok, seed=1)
    c = load_causal_lm("tiny-gpt2", tok, seed=2)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_spec_lists_presets_with_did_you_mean(tok):
    with pytest.raises(UserError, match="Did you mean 'tiny-gpt2'") as err:
        load_causal_lm("tiny-gtp2", tok)
    assert all(name in str(err.value) for name in MODEL_PRESETS)


def test_directory_without_config_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_causal_lm(tmp_path, tok)


def test_tokenizer_larger_than_model_vocab_is_a_user_error(tok, tmp_path):
    small = make_tokenizer(n_words=10)
    save_model(load_causal_lm("tiny-gpt2", small), small, tmp_path / "m")
    with pytest.raises(UserError, match=rf"{len(tok)} tokens.*only {len(small)}"):
        load_causal_lm(tmp_path / "m", tok)


def test_dtype(tok):
    model = load_causal_lm("tiny-llama", tok, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Scalar models


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_scalar_model_trunk_copied_from_causal_lm(tok, tmp_path, name):
    causal = load_causal_lm(name, tok, seed=3)
    save_model(causal, tok, tmp_path / "sft")
    rm = load_scalar_model(tmp_path / "sft", tok, init_from_causal_lm=True)
    assert isinstance(rm, AutoModelForSequenceClassification._model_mapping[type(rm.config)])
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == PAD
    trunk = causal.base_model.state_dict()
    assert trunk.keys() == rm.base_model.state_dict().keys()
    assert all(torch.equal(v, rm.base_model.state_dict()[k]) for k, v in trunk.items())
    assert torch.count_nonzero(rm.score.weight) == 0  # zero-init head: every score starts at 0
    ids, mask = left_padded([4, 2], 4, len(tok))
    assert torch.equal(token_scores(rm, ids, mask), torch.zeros(2, 4))


def test_scalar_head_small_init_and_preset_spec(tok):
    rm = load_scalar_model("tiny-gpt2", tok, init_from_causal_lm=True, head_init_std=0.02, seed=0)
    assert 0.005 < rm.score.weight.std().item() < 0.05


def test_sequence_scores_pick_last_real_token_left_and_right_padding(tok):
    rm = load_scalar_model("tiny-gpt2", tok, init_from_causal_lm=True, head_init_std=0.5)
    ids, left_mask = left_padded([5, 3, 1], 5, len(tok))
    left = sequence_scores(rm, ids, left_mask)
    per_token = token_scores(rm, ids, left_mask)
    assert torch.allclose(left, per_token[:, -1])
    # The same rows right-padded: score at the last real token, same value.
    right_ids = torch.full_like(ids, PAD)
    right_mask = torch.zeros_like(left_mask)
    for row, n in enumerate([5, 3, 1]):
        right_ids[row, :n] = ids[row, 5 - n :]
        right_mask[row, :n] = True
    right = sequence_scores(rm, right_ids, right_mask)
    assert torch.allclose(left, right, atol=1e-5)
    # HF's own pooling (last non-pad id, right padding) agrees.
    hf = rm(input_ids=right_ids, attention_mask=right_mask).logits.squeeze(-1)
    assert torch.allclose(right, hf, atol=1e-5)
    assert left.dtype == torch.float32 and left.shape == (3,)


def test_reward_normalisation_mean_zero_std_one_and_persists(tok, tmp_path):
    rm = load_scalar_model("tiny-llama", tok, init_from_causal_lm=True, head_init_std=0.5)
    ids, mask = left_padded([6, 5, 4, 3, 6, 2, 1, 6], 6, len(tok))
    raw = sequence_scores(rm, ids, mask, normalise=False)
    assert torch.equal(sequence_scores(rm, ids, mask), raw)  # gain 1, bias 0 by default
    set_reward_normalisation(rm, raw)
    normalised = sequence_scores(rm, ids, mask)
    assert abs(normalised.mean().item()) < 1e-5
    assert abs(normalised.std(unbiased=False).item() - 1) < 1e-5
    save_model(rm, tok, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["reward_gain"] == pytest.approx(rm.config.reward_gain)
    reloaded = load_scalar_model(tmp_path / "rm", tok)  # the value model starts from the RM
    assert torch.allclose(sequence_scores(reloaded, ids, mask), normalised, atol=1e-6)


def test_reward_normalisation_of_constant_scores_is_a_user_error(tok):
    rm = load_scalar_model("tiny-gpt2", tok, init_from_causal_lm=True)
    with pytest.raises(UserError, match="std 1"):
        set_reward_normalisation(rm, torch.zeros(8))


def test_causal_lm_dir_is_not_a_reward_model(tok, tmp_path):
    save_model(load_causal_lm("tiny-gpt2", tok), tok, tmp_path / "sft")
    with pytest.raises(UserError, match="GPT2LMHeadModel.*init_from_causal_lm"):
        load_scalar_model(tmp_path / "sft", tok)
    with pytest.raises(UserError, match="no such directory"):
        load_scalar_model(tmp_path / "missing", tok)


# ---------------------------------------------------------------------------------------------
# Saving


def test_save_round_trip_causal_and_scalar(tok, tmp_path):
    causal = load_causal_lm("tiny-llama", tok, seed=5)
    out = save_model(causal, tok, tmp_path / "policy", extra_json={"meta": {"stage": "sft"}})
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "meta.json"} <= files
    assert json.loads((out / "meta.json").read_text()) == {"stage": "sft"}
    ids, mask = left_padded([6, 3], 6, len(tok))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(causal(input_ids=ids, attention_mask=mask).logits,
                       loaded(input_ids=ids, attention_mask=mask).logits)

    rm = load_scalar_model(out, tok, init_from_causal_lm=True, head_init_std=0.1)
    save_model(rm, tok, tmp_path / "rm")
    loaded_rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert torch.equal(token_scores(rm, ids, mask), token_scores(loaded_rm, ids, mask))


def test_save_replaces_existing_directory(tok, tmp_path):
    save_model(load_causal_lm("tiny-gpt2", tok, seed=0), tok, tmp_path / "m")
    second = load_causal_lm("tiny-gpt2", tok, seed=1)
    save_model(second, tok, tmp_path / "m")
    loaded = load_causal_lm(tmp_path / "m", tok)
    assert torch.equal(loaded.transformer.wte.weight, second.transformer.wte.weight)


# ---------------------------------------------------------------------------------------------
# Dropout, parameters


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_disable_dropout_makes_train_mode_deterministic(tok, name):
    model = load_causal_lm(name, tok, dropout=0.3).train()
    ids, mask = left_padded([6, 4], 6, len(tok))
    if name == "tiny-gpt2":  # Llama has attention dropout only, which SDPA applies internally
        assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    disable_dropout(model)
    assert model.training
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits)
    assert all(getattr(m, "attention_dropout", 0.0) == 0 for m in model.modules())


def test_count_parameters_counts_tied_weights_once(tok):
    model = load_causal_lm("tiny-gpt2", tok)
    d, v, ctx, layers = 128, len(tok), 128, 2
    per_block = 12 * d * d + 13 * d  # attention 4d^2+4d, MLP 8d^2+5d, two LayerNorms 4d
    assert count_parameters(model) == v * d + ctx * d + layers * per_block + 2 * d


# ---------------------------------------------------------------------------------------------
# LoRA


def _perturb_lora(model) -> None:
    """LoRA's B starts at zero (adapter = identity); make it matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_lora_default_targets_disable_and_merge(tok, name, tmp_path):
    base = load_causal_lm(name, tok, seed=0).eval()
    ids, mask = left_padded([6, 4], 6, len(tok))
    base_logits = base(input_ids=ids, attention_mask=mask).logits
    model = apply_lora(base, r=4, alpha=8, dropout=0.0)
    targeted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    expected = {"c_attn", "c_proj", "c_fc"} if name == "tiny-gpt2" else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert targeted == expected
    assert 0 < count_parameters(model, trainable_only=True) < count_parameters(model) / 4
    _perturb_lora(model)
    adapted = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(adapted, base_logits)
    with adapters_disabled(model):
        disabled = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(disabled, base_logits, atol=1e-6)
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, adapted)
    save_model(model, tok, tmp_path / "policy")  # saved merged: a plain HF model
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, adapted, atol=1e-5)


def test_lora_on_scalar_model_trains_head_and_saves_merged(tok, tmp_path):
    rm = load_scalar_model("tiny-gpt2", tok, init_from_causal_lm=True, head_init_std=0.1)
    model = apply_lora(rm, r=2, alpha=4, dropout=0.0)
    assert any("score" in n and p.requires_grad for n, p in model.named_parameters())
    _perturb_lora(model)
    ids, mask = left_padded([5, 2], 5, len(tok))
    expected = sequence_scores(model, ids, mask)
    save_model(model, tok, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    assert torch.allclose(sequence_scores(loaded, ids, mask), expected, atol=1e-5)
    assert any("lora" in n for n, _ in model.named_parameters())  # the live model is untouched


def test_adapters_disabled_needs_a_lora_model(tok):
    model = load_causal_lm("tiny-gpt2", tok)
    with pytest.raises(TypeError, match="no LoRA adapters"), adapters_disabled(model):
        pass


def test_missing_peft_is_a_user_error(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(UserError, match=r"pip install ppo-rlhf\[lora\]"):
        apply_lora(load_causal_lm("tiny-gpt2", tok), r=2, alpha=4, dropout=0.0)


def test_gpt2_built_here_uses_the_exact_gelu_and_saved_ones_keep_theirs(tok, tmp_path):
    """Presets and size specs build GPT-2 with the exact (erf) GELU, torch's faster CPU kernel;
    a directory keeps the activation it was saved with."""
    from transformers.activations import GELUActivation, GELUTanh

    for spec in ("tiny-gpt2", "gpt2:layers=1,hidden=32,heads=2"):
        model = load_causal_lm(spec, tok)
        assert model.config.activation_function == "gelu"
        assert {type(block.mlp.act) for block in model.transformer.h} == {GELUActivation}
    old = load_causal_lm("tiny-gpt2", tok)
    old.config.activation_function = "gelu_pytorch_tanh"
    old.save_pretrained(tmp_path / "tanh")
    again = load_causal_lm(str(tmp_path / "tanh"), tok)
    assert again.config.activation_function == "gelu_pytorch_tanh"
    assert {type(block.mlp.act) for block in again.transformer.h} == {GELUTanh}


def test_gelu_new_directories_run_the_fused_gelu_with_the_same_outputs(tok, tmp_path):
    """GPT-2 dirs saved with `gelu_new` load with the fused tanh GELU: same function, config kept."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import GELUTanh, NewGELUActivation

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=4, n_positions=32,
                        activation_function="gelu_new", pad_token_id=PAD, eos_token_id=EOS,
                        bos_token_id=BOS)
    reference = GPT2LMHeadModel(config).eval()
    save_model(reference, tok, tmp_path / "gpt2")
    loaded = load_causal_lm(tmp_path / "gpt2", tok)
    acts = [type(m) for m in loaded.modules() if isinstance(m, (GELUTanh, NewGELUActivation))]
    assert acts == [GELUTanh, GELUTanh]
    ids, mask = left_padded([6, 3], 6, len(tok))
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                               reference(input_ids=ids, attention_mask=mask).logits,
                               rtol=0, atol=1e-5)
    save_model(loaded, tok, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["activation_function"] == "gelu_new"

    rm = load_scalar_model(tmp_path / "gpt2", tok, init_from_causal_lm=True)
    save_model(rm, tok, tmp_path / "rm")
    loaded_rm = load_scalar_model(tmp_path / "rm", tok)
    assert not any(isinstance(m, NewGELUActivation) for m in loaded_rm.modules())


# ---------------------------------------------------------------------------------------------
# One tokenizer per run


def _word_tokenizer(tokens: list[str], pad="<|pad|>", eos="<|eos|>", bos="<|bos|>"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, eos_token=eos,
                                   bos_token=bos, unk_token="<unk>")


SPECIALS = ["<|pad|>", "<|eos|>", "<|bos|>", "<unk>"]


def test_same_tokenizer_passes_from_directories_and_objects(tok, tmp_path):
    save_model(load_causal_lm("tiny-gpt2", tok), tok, tmp_path / "sft")
    save_model(load_scalar_model("tiny-gpt2", tok, init_from_causal_lm=True), tok, tmp_path / "rm")
    check_same_tokenizer(tmp_path / "sft", "policy", tmp_path / "rm", "reward model")
    check_same_tokenizer(str(tmp_path / "sft"), "policy", make_tokenizer(), "reward model")
    check_same_tokenizer("tiny-gpt2", "policy", tmp_path / "rm", "reward model")  # a preset: built to fit


@pytest.mark.parametrize("other, message", [
    # 13 more words: the 263- vs 276-token case of issue 13, in small
    (lambda: make_tokenizer(53), r"vocabulary size 44 vs 57; vocabularies differ \(sha256 \w{12} vs "
                                 r"\w{12}\): 13 tokens only in reward model's \(e.g. 'w40', 'w41', 'w42'\)"),
    # same size and specials, two words swapped: the ids mean other tokens
    (lambda: _word_tokenizer(SPECIALS + ["w1", "w0"] + [f"w{i}" for i in range(2, 40)]),
     r"use different tokenizers: vocabularies differ \(sha256 \w+ vs \w+\): 2 tokens with other "
     r"ids \(e.g. 'w0', 'w1'\)"),
    # eos and bos exchanged
    (lambda: _word_tokenizer(SPECIALS + [f"w{i}" for i in range(40)], eos="<|bos|>", bos="<|eos|>"),
     r"eos_token_id 1 vs 2; bos_token_id 2 vs 1\."),
])
def test_mismatched_tokenizers_are_refused_naming_both_directories(tok, tmp_path, other, message):
    save_model(load_causal_lm("tiny-gpt2", tok), tok, tmp_path / "sft")
    other = other()
    save_model(load_scalar_model("tiny-gpt2", other, init_from_causal_lm=True), other, tmp_path / "rm")
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    with pytest.raises(UserError, match=message) as err:
        check_same_tokenizer(sft, "policy", rm, "reward model")
    assert f"policy ({sft}) and reward model ({rm}) use different tokenizers" in str(err.value)
    assert "fix:" in str(err.value)


def test_vocab_hash_depends_on_tokens_and_ids_only(tok):
    same = _word_tokenizer(SPECIALS + [f"w{i}" for i in range(40)])
    assert vocab_sha256(same) == vocab_sha256(tok) and len(vocab_sha256(tok)) == 64
    assert vocab_sha256(make_tokenizer(41)) != vocab_sha256(tok)


# ---------------------------------------------------------------------------------------------
# Value model from the reward model


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_folded_normalisation_makes_the_raw_head_output_the_normalised_score(tok, tmp_path, name):
    rm = load_scalar_model(name, tok, init_from_causal_lm=True, head_init_std=0.5)
    ids, mask = left_padded([6, 5, 4, 3, 6, 2, 1, 6], 6, len(tok))
    set_reward_normalisation(rm, sequence_scores(rm, ids, mask, normalise=False))
    gain, bias = rm.config.reward_gain, rm.config.reward_bias
    assert abs(gain - 1) > 0.1 and abs(bias) > 0.01  # a normalisation that matters
    normalised = sequence_scores(rm, ids, mask)
    raw_tokens = token_scores(rm, ids, mask)
    save_model(rm, tok, tmp_path / "rm")

    value = fold_reward_normalisation(load_scalar_model(tmp_path / "rm", tok))
    assert (value.config.reward_gain, value.config.reward_bias) == (1.0, 0.0)
    # every position's raw output is now gain * raw + bias; the sequence scores are unchanged
    assert torch.allclose(token_scores(value, ids, mask), gain * raw_tokens + bias, atol=1e-5)
    assert torch.allclose(sequence_scores(value, ids, mask, normalise=False), normalised, atol=1e-5)
    assert torch.allclose(sequence_scores(value, ids, mask), normalised, atol=1e-5)
    assert value.score.bias.requires_grad  # the value model trains its head's bias too

    save_model(value, tok, tmp_path / "value")  # the bias survives save and load
    reloaded = load_scalar_model(tmp_path / "value", tok)
    assert torch.allclose(token_scores(reloaded, ids, mask), gain * raw_tokens + bias, atol=1e-5)
    again = fold_reward_normalisation(reloaded)  # folding twice changes nothing
    assert torch.allclose(token_scores(again, ids, mask), gain * raw_tokens + bias, atol=1e-5)


def test_fold_after_lora_wrapping_is_refused(tok):
    model = apply_lora(load_scalar_model("tiny-gpt2", tok, init_from_causal_lm=True), r=2, alpha=4,
                       dropout=0.0)
    with pytest.raises(TypeError, match="fold before wrapping the model with LoRA"):
        fold_reward_normalisation(model)


# Each preset at a size that runs in seconds; the presets' own architecture (qwen2 for qwen-0.5b-like).
_TINY_SIZES = {"tiny-gpt2": [], "tiny-llama": [], "small-gpt2": ["model.layers=1", "model.hidden=64"],
               "qwen-0.5b-like": ["model.layers=1", "model.hidden=32", "model.heads=2"]}


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    from ppo_rlhf import api

    root = tmp_path_factory.mktemp("presets")
    api.tokenizer(out_dir=str(root / "tok"), task="arithmetic", vocab_size=320)
    api.data(out_dir=str(root / "data"), task="arithmetic", n_sft=16, n_prefs=16, n_prompts=16, n_eval=8)
    return root


@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
def test_every_model_preset_goes_sft_reward_rl_eval(arithmetic_run, tmp_path, preset):
    """A model built from each preset is usable by the next stage: its saved tokenizer reloads with
    exactly the model's vocabulary (a qwen2 model once got Qwen2Tokenizer, one token longer)."""
    from ppo_rlhf import api
    from ppo_rlhf.tokenizer import load_tokenizer

    assert set(_TINY_SIZES) == set(MODEL_PRESETS), "give the new preset a tiny size above"
    root, data = arithmetic_run, arithmetic_run / "data"
    run = ["run.tensorboard=false", "run.eval_every=0", "run.save_every=0"]
    api.sft(out_dir=str(tmp_path / "sft"), train_file=str(data / "sft_train.jsonl"), max_steps=2,
            batch_size=4, overrides=[f"model.path={preset}", f"model.tokenizer={root / 'tok'}",
                                     *_TINY_SIZES[preset], *run])
    sft = tmp_path / "sft" / "model"
    model = AutoModelForCausalLM.from_pretrained(sft)
    assert model.config.model_type == MODEL_PRESETS[preset]["model_type"]
    assert len(load_tokenizer(sft)) == model.get_input_embeddings().num_embeddings
    api.reward(out_dir=str(tmp_path / "rm"), train_file=str(data / "prefs_train.jsonl"), max_steps=2,
               batch_size=4, norm_samples=4, max_new_tokens=4, overrides=[f"model.path={sft}", *run])
    api.rl(out_dir=str(tmp_path / "rl"), policy=str(sft), reward_model=str(tmp_path / "rm" / "model"),
           prompts_file=str(data / "prompts_train.jsonl"), overrides=[
               "train.updates=1", "rollout.batch_size=4", "rollout.max_new_tokens=4", *run])
    result = api.evaluate(policy=str(tmp_path / "rl" / "model"), reference=str(sft),
                          reward_model=str(tmp_path / "rm" / "model"), task="arithmetic",
                          prompts_file=str(data / "prompts_eval.jsonl"), n=4, max_new_tokens=4)
    assert result["n"] == 4 and 0 <= result["gold_reward"] <= 1
