"""LoRA in every stage, and a user's own Hugging Face model directory as the starting point.

Each chain runs `ppo-rlhf sft -> reward -> ppo` (the CLI entry point, in-process) for a few
steps on a tiny model, then checks the outputs with plain `transformers`: merged weights that load
without peft, only adapter (and RM head) parameters moved, chat templates applied, and the reward
model's exported score equal to ours.
"""

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from ppo_rlhf.cli import main
from ppo_rlhf.config import PPOConfig, build_config
from ppo_rlhf.data.collate import collate_prompts
from ppo_rlhf.data.encode import encode_prompts
from ppo_rlhf.generation import generate, response_logprobs
from ppo_rlhf.guards import NonFiniteGuard
from ppo_rlhf.models import load_causal_lm, load_scalar_model, sequence_scores
from ppo_rlhf.stages.loop import StepContext
from ppo_rlhf.stages.rl import RLTrainer
from ppo_rlhf.tasks import get_task
from ppo_rlhf.tokenizer import load_tokenizer

# Llama-3-like markers, so the test can see the template in the encoded prompts.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
GPT2_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)
MARKERS = {"llama": "<|start|>assistant\n", "gpt2": "### assistant:"}


def _bpe(texts, specials, vocab_size=320):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe


def _user_llama(texts, path):
    """A Llama-style checkpoint as a user would have it: bos/eos/pad tokens and a chat template."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(texts, ["<s>", "</s>", "<pad>"]),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = LLAMA_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def _user_gpt2(texts, path):
    """A GPT-2-style checkpoint: one <|endoftext|> token (bos = eos), no pad token, a vocabulary
    exactly the tokenizer's size -- like the real GPT-2 -- and a chat template."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(texts, ["<|endoftext|>"]),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.chat_template = GPT2_TEMPLATE
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Arithmetic data: SFT and prompts in the {"messages": [...]} format, string preferences."""
    root = tmp_path_factory.mktemp("interop_data")
    task, rng = get_task("arithmetic"), random.Random(0)
    prompts = task.sample_prompts(48, rng)
    _write_jsonl(root / "sft.jsonl", [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": task.demonstration(p, rng)}]}
        for p in prompts])
    labelled = [(p, task.label_pair(p, task.candidate(p, rng), task.candidate(p, rng), rng, 0.5)) for p in prompts]
    _write_jsonl(root / "prefs.jsonl", [{"prompt": p, "chosen": pair[0], "rejected": pair[1]}
                                        for p, pair in labelled if pair is not None])
    _write_jsonl(root / "prompts.jsonl", [{"messages": [{"role": "user", "content": p}]} for p in prompts[:16]])
    return root, task.tokenizer_corpus(random.Random(1))


def cli(*args):
    assert main([str(a) for a in args]) == 0


def run_chain(root, data_dir, start, lora_r):
    """sft -> reward -> ppo from `start`, a few steps each; returns the three output dirs."""
    lora = [f"model.lora_r={lora_r}", "model.lora_alpha=8"] if lora_r else []
    common = ["run.tensorboard=false", "run.eval_every=0", "run.save_every=0"]
    cli("sft", "--out", root / "sft", f"train_file={data_dir / 'sft.jsonl'}", f"model.path={start}",
        "max_steps=3", "batch_size=8", "optim.lr=1e-2", "optim.warmup_steps=0", *lora, *common)
    cli("reward", "--out", root / "reward", f"train_file={data_dir / 'prefs.jsonl'}",
        f"model.path={root / 'sft' / 'model'}", "max_steps=3", "batch_size=8", "norm_samples=16",
        "head_init_std=0.02", "optim.lr=1e-2", "optim.warmup_steps=0", *lora, *common)
    cli("ppo", "--out", root / "ppo", f"policy={root / 'sft' / 'model'}", f"reward_model={root / 'reward' / 'model'}",
        f"prompts_file={data_dir / 'prompts.jsonl'}", "train.updates=2", "rollout.batch_size=8",
        "rollout.max_new_tokens=6", "optim.lr=1e-2", "optim.warmup_steps=0", "task=arithmetic",
        f"eval_prompts_file={data_dir / 'prompts.jsonl'}", "eval_samples=8", *lora, *common)
    return root / "sft" / "model", root / "reward" / "model", root / "ppo" / "model"


def _params(model):
    return {n: p.detach() for n, p in model.state_dict().items()}


def assert_low_rank_update(before, after, r, *, head=None):
    """Only LoRA-targeted matrices moved, each by a rank <= r delta (and `head`, if named)."""
    moved = 0
    for name, old in before.items():
        new = after[name][tuple(slice(0, n) for n in old.shape)]  # a pad row may have been added
        if head and name.startswith(head):
            assert not torch.equal(old, new), f"{name}: the head did not train"
            continue
        delta = (new - old).double()
        if not delta.abs().max() > 0:
            continue
        assert delta.dim() == 2, f"{name} moved but is not a LoRA-targeted matrix"
        assert torch.linalg.matrix_rank(delta, rtol=1e-4) <= r, name
        moved += 1
    assert moved, "no adapter update reached the merged weights"


@pytest.mark.parametrize("arch, lora_r", [("llama", 4), ("gpt2", 4)])
def test_user_model_dir_chain_with_lora(tmp_path, data, arch, lora_r):
    data_dir, texts = data
    start = tmp_path / f"user-{arch}"
    (_user_llama if arch == "llama" else _user_gpt2)(texts, start)
    sft_dir, rm_dir, ppo_dir = run_chain(tmp_path, data_dir, start, lora_r)

    # Merged, plain transformers models: no peft needed, no adapter weights left.
    base = AutoModelForCausalLM.from_pretrained(start)
    sft = AutoModelForCausalLM.from_pretrained(sft_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    ppo = AutoModelForCausalLM.from_pretrained(ppo_dir)
    for model in (sft, rm, ppo):
        assert not any("lora" in n for n in model.state_dict())
    assert sft.config.model_type == arch and rm.config.num_labels == 1

    # Only adapters (and the RM head) trained: every other weight is its starting value.
    sft_params = _params(sft)
    assert_low_rank_update(_params(base), sft_params, lora_r)
    rm_trunk = {f"{rm.base_model_prefix}.{k}": v for k, v in _params(sft.base_model).items()}
    assert_low_rank_update({**rm_trunk, "score.weight": torch.zeros_like(rm.score.weight)}, _params(rm),
                           lora_r, head="score.")
    assert_low_rank_update(sft_params, _params(ppo), lora_r)

    # The final evaluation measures KL to the reference (with LoRA: the adapters disabled).
    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert summary["kl"] != 0.0 and "gold_reward" in summary  # k1 estimate: either sign

    # The chat template travels with every output and is applied to the prompts.
    tok = load_tokenizer(ppo_dir)
    assert tok.chat_template
    prompts, _ = encode_prompts(tok, [[{"role": "user", "content": "Q: 1+2="}]], 64)
    assert MARKERS[arch] in tok.decode(prompts[0])


@pytest.fixture(scope="module")
def lora_chain(tmp_path_factory, data):
    """A full-weight SFT model and RM from a user's Llama directory (the PPO start for LoRA)."""
    root = tmp_path_factory.mktemp("lora_ppo")
    data_dir, texts = data
    _user_llama(texts, root / "user")
    common = ["run.tensorboard=false", "run.eval_every=0", "run.save_every=0", "max_steps=2", "batch_size=8"]
    cli("sft", "--out", root / "sft", f"train_file={data_dir / 'sft.jsonl'}", f"model.path={root / 'user'}", *common)
    cli("reward", "--out", root / "reward", f"train_file={data_dir / 'prefs.jsonl'}",
        f"model.path={root / 'sft' / 'model'}", "norm_samples=16", "head_init_std=0.02", *common)
    return root, data_dir


def test_lora_ppo_reference_is_the_sft_model(lora_chain):
    root, data_dir = lora_chain
    cfg = build_config(PPOConfig, overrides=[
        f"policy={root / 'sft' / 'model'}", f"reward_model={root / 'reward' / 'model'}",
        f"prompts_file={data_dir / 'prompts.jsonl'}", f"out_dir={root / 'ppo'}", "rollout.batch_size=8",
        "rollout.max_new_tokens=6", "model.lora_r=4", "optim.lr=1e-2", "optim.warmup_steps=0",
        "run.tensorboard=false"])
    torch.manual_seed(0)
    t = RLTrainer(cfg, torch.device("cpu"))
    assert t.reference.model is None  # no second copy of the weights
    assert t.policy_params and all("lora_" in n for n, p in t.policy.named_parameters() if p.requires_grad)
    t.step(StepContext(1, NonFiniteGuard(5), None))  # the adapters move away from zero

    sft = load_causal_lm(root / "sft" / "model", t.tokenizer).eval()
    batch = collate_prompts(t.prompts.ids[:8], t.tokenizer.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    resp, resp_mask = generate(t.policy, ids, mask, max_new_tokens=6, eos_token_id=t.tokenizer.eos_token_id,
                               pad_token_id=t.tokenizer.pad_token_id, temperature=1.0,
                               generator=torch.Generator().manual_seed(0))
    seq, seq_mask = torch.cat([ids, resp], 1), torch.cat([mask, resp_mask], 1)
    ref_lp = t.reference.logprobs(seq, seq_mask, ids.size(1), cfg.rollout.temperature)
    with torch.no_grad():
        sft_lp, _ = response_logprobs(sft, seq, seq_mask, ids.size(1), temperature=cfg.rollout.temperature)
        policy_lp, _ = response_logprobs(t.policy, seq, seq_mask, ids.size(1), temperature=cfg.rollout.temperature)
    m = resp_mask
    torch.testing.assert_close(ref_lp[m], sft_lp[m], atol=1e-5, rtol=1e-5)
    assert (policy_lp[m] - sft_lp[m]).abs().max() > 1e-4  # the adapted policy is not the base


def test_exported_reward_model_scores_like_ours(lora_chain):
    root, _ = lora_chain
    rm_dir = root / "reward" / "model"
    tok = load_tokenizer(rm_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    ours = load_scalar_model(rm_dir, tok).eval()
    texts = ["Q: 1+2= 3", "Q: 12+30= 42 and more", "Q: 7+7="]
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])  # right padding
    mask = ids != tok.pad_token_id
    with torch.no_grad():
        raw = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # HF pools the last non-pad token
        expected = hf.config.reward_gain * raw + hf.config.reward_bias
        got = sequence_scores(ours, ids, mask)
    assert hf.config.reward_gain != 1.0 and hf.config.reward_bias != 0.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
