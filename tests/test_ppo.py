"""The PPO stage in-process: which parameters move, how many optimizer steps a config gives,
gradient accumulation, reward shaping details."""

import json
import random

import pytest
import torch

from ppo_rlhf.config import PPOConfig, build_config
from ppo_rlhf.metrics import PhaseTimer
from ppo_rlhf.models import load_causal_lm, load_scalar_model, save_model, token_scores
from ppo_rlhf.rollout import dense_credit, shape_scores, truncated_rows
from ppo_rlhf.stages.ppo import PPOTrainer, minibatch_indices
from ppo_rlhf.tasks import get_task
from ppo_rlhf.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    task = get_task("arithmetic")
    tok = train_tokenizer(task.tokenizer_corpus(random.Random(0)), 320)
    policy = load_causal_lm("tiny-gpt2", tok, seed=0)
    save_model(policy, tok, root / "sft")
    rm = load_scalar_model(str(root / "sft"), tok, init_from_causal_lm=True, head_init_std=0.02, seed=1)
    save_model(rm, tok, root / "rm")
    prompts = task.sample_prompts(32, random.Random(0))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                            for t in task.pretrain_texts(16, random.Random(0))))
    return root


def make_trainer(dirs, *overrides):
    cfg = build_config(PPOConfig, overrides=[
        f"policy={dirs / 'sft'}", f"reward_model={dirs / 'rm'}", f"prompts_file={dirs / 'prompts.jsonl'}",
        f"out_dir={dirs / 'out'}", "task=arithmetic", "rollout.batch_size=8", "run.tensorboard=false",
        "train.ppo_epochs=2", "train.num_minibatches=2", "optim.lr=1e-3", *overrides])
    torch.manual_seed(0)
    t = PPOTrainer(cfg, torch.device("cpu"))
    t.gen.manual_seed(0)
    t.shuffle_gen.manual_seed(0)
    return t


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_policy_and_value_move_reference_and_reward_do_not(dirs):
    t = make_trainer(dirs)
    before = {name: snapshot(getattr(t, name)) for name in ("policy", "value_model", "reference", "reward_model")}
    metrics, _ = t.iteration(list(range(8)), PhaseTimer())
    assert changed(before["policy"], t.policy)
    assert changed(before["value_model"], t.value_model)
    assert not changed(before["reference"], t.reference)
    assert not changed(before["reward_model"], t.reward_model)
    assert metrics["train/optimizer_steps"] == 2 * 2
    for key in ("objective/kl", "policy/approx_kl", "policy/clipfrac", "value/clipfrac",
                "value/explained_variance", "kl_ctl/beta", "objective/gold_reward"):
        assert key in metrics


def test_optimizer_steps_match_config(dirs):
    t = make_trainer(dirs, "train.ppo_epochs=3", "train.num_minibatches=4", "train.grad_accum=2")
    t.iteration(list(range(8)), PhaseTimer())
    assert t.policy_opt.state[t.policy_params[0]]["step"].item() == 12
    assert t.value_opt.state[t.value_params[0]]["step"].item() == 12
    assert t.policy_sched.last_epoch == 12


def test_critic_warmup_updates_only_the_value_model(dirs):
    t = make_trainer(dirs, "train.critic_warmup_updates=1")
    before = snapshot(t.policy)
    before_v = snapshot(t.value_model)
    t.iteration(list(range(8)), PhaseTimer())
    assert not changed(before, t.policy)
    assert changed(before_v, t.value_model)


def test_gradient_accumulation_equals_one_big_minibatch(dirs):
    """grad_accum splits a minibatch into micro-batches weighted by their token share: the update
    must equal the one computed on the whole minibatch at once."""
    # Adam's first step is lr * g / (|g| + eps): with the default eps, float32 summation noise in
    # gradients near 1e-8 moves such weights by up to lr, so eps is raised to compare the updates.
    a = make_trainer(dirs, "train.ppo_epochs=1", "train.num_minibatches=1", "train.grad_accum=1",
                     "optim.max_grad_norm=0", "optim.adam_eps=1e-4")
    b = make_trainer(dirs, "train.ppo_epochs=1", "train.num_minibatches=1", "train.grad_accum=4",
                     "optim.max_grad_norm=0", "optim.adam_eps=1e-4")
    a.iteration(list(range(8)), PhaseTimer())
    b.iteration(list(range(8)), PhaseTimer())
    for (n, pa), pb in zip(a.policy.named_parameters(), b.policy.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=n)
    for pa, pb in zip(a.value_model.parameters(), b.value_model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_ptx_and_entropy_losses_are_used(dirs):
    t = make_trainer(dirs, "loss.ptx_coef=2.0", f"ptx_file={dirs / 'text.jsonl'}", "loss.entropy_coef=0.01")
    m, _ = t.iteration(list(range(8)), PhaseTimer())
    assert m["loss/ptx"] > 0 and "loss/entropy" in m


def test_adaptive_kl_controller_moves_beta(dirs):
    t = make_trainer(dirs, "reward.kl_control=adaptive", "reward.kl_coef=0.1", "reward.kl_target=0.001",
                     "reward.kl_horizon=100")
    m, _ = t.iteration(list(range(8)), PhaseTimer())
    kl = m["objective/kl"]
    e = max(-0.2, min(0.2, kl / 0.001 - 1))
    assert t.kl_ctl.value == pytest.approx(0.1 * (1 + e * 8 / 100))


def test_minibatches_partition_the_rollout():
    parts = minibatch_indices(10, 3, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]  # sizes differ by at most one (every rank gets rows)


def test_missing_eos_penalty_and_clip():
    cfg = build_config(PPOConfig, overrides=["rollout.missing_eos_penalty=-1", "reward.score_clip=2"])
    ids = torch.tensor([[5, 9, 0], [5, 6, 7]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    trunc = truncated_rows(ids, mask, eos_id=9)
    assert trunc.tolist() == [False, True]
    scores = shape_scores(torch.tensor([5.0, 0.3]), trunc, cfg, None)
    assert scores.tolist() == [2.0, -1.0]
    cfg.rollout.penalise_missing_eos = False
    assert shape_scores(torch.tensor([0.5, 0.3]), trunc, cfg, None).tolist() == pytest.approx([0.5, 0.3])


def test_dense_credit_telescopes_to_last_minus_prompt(dirs):
    from ppo_rlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(dirs / "rm")
    rm = load_scalar_model(str(dirs / "rm"), tok)
    seq = torch.randint(5, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    rmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    mask[:, 3:] = rmask
    d = dense_credit(rm, seq, mask, 3, rmask)
    s = token_scores(rm, seq, mask) * float(rm.config.reward_gain)
    last = rmask.sum(1) + 2
    expect = s[torch.arange(3), last] - s[:, 2]
    torch.testing.assert_close(d.sum(1), expect, rtol=1e-4, atol=1e-5)


def test_value_head_on_the_policy_trunk(dirs):
    t = make_trainer(dirs, "train.value_model=policy_head", "train.critic_warmup_updates=1")
    assert t.value_model.base_model is t.policy.base_model
    head = {n: p.detach().clone() for n, p in t.value_model.named_parameters() if "score" in n}
    trunk = snapshot(t.policy)
    t.iteration(list(range(8)), PhaseTimer())  # critic warm-up: only the head moves
    assert not changed(trunk, t.policy)
    assert any(not torch.equal(head[n], p) for n, p in t.value_model.named_parameters() if n in head)
    t.step = 1
    t.iteration(list(range(8)), PhaseTimer())  # then the shared trunk learns from both losses
    assert changed(trunk, t.policy)
