"""The RL stage in-process: which parameters move, how many optimizer steps a config gives, that
every algorithm preset runs, that a minibatch's gradient does not depend on how it is split, the
TRPO trust region, group sampling, dynamic sampling and reward functions without a reward model."""

import dataclasses
import json
import random

import pytest
import torch

from ppo_rlhf import distributed as dist
from ppo_rlhf.algo.losses import AGGREGATIONS
from ppo_rlhf.config import PPOConfig, algorithm_presets, build_config
from ppo_rlhf.guards import NonFiniteGuard
from ppo_rlhf.models import load_causal_lm, load_scalar_model, save_model, token_scores
from ppo_rlhf.rollout import dense_credit, shape_scores, truncated_rows
from ppo_rlhf.stages.loop import StepContext
from ppo_rlhf.stages.rl import RLTrainer, minibatch_indices
from ppo_rlhf.tasks import get_task


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, arithmetic_models):
    root = tmp_path_factory.mktemp("rl")
    task = get_task("arithmetic")
    for name in ("sft", "rm"):  # the session's shared tokenizer, policy and reward model (conftest)
        (root / name).symlink_to(arithmetic_models / name, target_is_directory=True)
    prompts = task.sample_prompts(32, random.Random(0))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": str(len(p))}) + "\n"
                                                for p in prompts))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                             for t in task.pretrain_texts(16, random.Random(0))))
    (root / "rewards.py").write_text(
        "def length_bonus(prompts, responses, answer, **_):\n"
        "    return [min(len(r), 8) / 8 for r in responses]\n")
    return root


def make_trainer(dirs, *overrides, reward_model=True):
    cfg = build_config(PPOConfig, overrides=[
        f"policy={dirs / 'sft'}", f"reward_model={dirs / 'rm' if reward_model else ''}",
        f"prompts_file={dirs / 'prompts.jsonl'}", f"out_dir={dirs / 'out'}", "task=arithmetic",
        "rollout.batch_size=8", "run.tensorboard=false", "train.num_minibatches=2",
        "optim.lr=1e-3", *overrides])
    torch.manual_seed(0)
    return RLTrainer(cfg, torch.device("cpu"))


def iterate(t, step=1):
    return t.step(StepContext(step, NonFiniteGuard(5), None)).metrics


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_policy_and_value_move_reference_and_reward_do_not(dirs):
    t = make_trainer(dirs)
    models = {"policy": t.policy, "value": t.value_model, "reference": t.reference.model, "reward": t.reward_model}
    before = {name: snapshot(m) for name, m in models.items()}
    metrics = iterate(t)
    assert changed(before["policy"], t.policy) and changed(before["value"], t.value_model)
    assert not changed(before["reference"], t.reference.model)
    assert not changed(before["reward"], t.reward_model)
    assert metrics["train/optimizer_steps"] == 2 * 2
    for key in ("objective/kl", "policy/approx_kl", "policy/clipfrac", "value/clipfrac",
                "value/explained_variance", "value/explained_variance_after", "kl_ctl/beta",
                "objective/gold_reward"):
        assert key in metrics


def test_optimizer_steps_match_config(dirs):
    t = make_trainer(dirs, "train.ppo_epochs=3", "train.num_minibatches=4", "train.grad_accum=2")
    iterate(t)
    assert t.policy_opt.state[t.policy_params[0]]["step"].item() == 12
    assert t.value_opt.state[t.value_params[0]]["step"].item() == 12
    assert t.policy_sched.last_epoch == 12


def test_critic_warmup_updates_only_the_value_model(dirs):
    t = make_trainer(dirs, "train.critic_warmup_updates=1")
    before, before_v = snapshot(t.policy), snapshot(t.value_model)
    m = iterate(t)
    assert not changed(before, t.policy) and changed(before_v, t.value_model)
    assert "policy/clipfrac" not in m and "value/clipfrac" in m


@pytest.mark.parametrize("name", algorithm_presets())
def test_every_algorithm_preset_runs_and_moves_the_policy(dirs, name):
    t = make_trainer(dirs, f"algo={name}", "rollout.batch_size=4", "algo.trpo.cg_iters=3")
    before = snapshot(t.policy)
    m = iterate(t)
    assert changed(before, t.policy), name
    assert (t.value_model is not None) == t.cfg.algo.critic
    assert t.name == name  # the console prefix and the metrics' stage: what runs
    assert m["train/optimizer_steps"] > 0 and all(v == v for k, v in m.items() if k.startswith("loss/")), m


def _minibatch_grads(t, exp, mb):
    t.policy_opt.zero_grad(set_to_none=True)
    t.value_opt.zero_grad(set_to_none=True)
    t.accumulate_gradients(exp, mb, update_policy=True, update_value=True)
    return [p.grad.clone() for p in t.policy_params + t.value_params]


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_a_minibatch_gradient_is_the_same_in_one_piece_in_micro_batches_or_over_two_ranks(
        dirs, aggregation, monkeypatch):
    """The loss weights come from the whole minibatch, so accumulation and DDP split it exactly.
    Two ranks are simulated in one process: each backpropagates its rows' loss times the world
    size, and DDP's gradient is the mean over the ranks."""
    t = make_trainer(dirs, f"algo.aggregation={aggregation}", "algo.samples_per_prompt=2", "rollout.batch_size=6")
    scored, _ = t.collect(list(range(6)), 1)
    from ppo_rlhf.rollout import make_experience
    exp = make_experience(scored, t.cfg, t.kl_ctl.value, t.max_new_tokens)
    mb = torch.arange(exp.sequences.size(0))
    whole = _minibatch_grads(t, exp, mb)
    t.cfg.train.grad_accum = 5
    accumulated = _minibatch_grads(t, exp, mb)
    t.cfg.train.grad_accum = 1
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    ranks = []
    for r in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        ranks.append(_minibatch_grads(t, exp, mb))
    for g, a, r0, r1 in zip(whole, accumulated, *ranks):
        torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((r0 + r1) / 2, g, rtol=1e-5, atol=1e-6)


def test_trpo_step_stays_in_the_trust_region(dirs):
    t = make_trainer(dirs, "algo=trpo", "algo.trpo.max_kl=0.005")
    for step in (1, 2):
        m = iterate(t, step)
        assert 0 < m["trpo/step_fraction"] <= 1
        assert m["trpo/kl"] <= 1.5 * 0.005 and m["trpo/surrogate_improvement"] > 0


def test_group_minibatches_keep_a_prompts_samples_together():
    parts = minibatch_indices(5, 3, 2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(15))
    for p in parts:
        groups = p.view(-1, 3) // 3
        assert (groups == groups[:, :1]).all() and ((p.view(-1, 3) % 3) == torch.arange(3)).all()
    single = minibatch_indices(10, 1, 3, torch.Generator().manual_seed(0))
    assert [len(p) for p in single] == [4, 3, 3]  # sizes differ by at most one (every rank gets rows)


def test_group_rollout_has_n_rows_per_prompt_in_order(dirs):
    t = make_trainer(dirs, "algo=grpo", "rollout.batch_size=4")
    scored, _ = t.collect([3, 1, 7, 5], 1)
    assert scored.prompt_index.tolist() == [3] * 4 + [1] * 4 + [7] * 4 + [5] * 4
    assert scored.groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    prompt_len = scored.prompt_len
    assert (scored.sequences[:4, :prompt_len] == scored.sequences[0, :prompt_len]).all()


def test_dynamic_sampling_drops_groups_without_reward_variance(dirs):
    # the length bonus saturates at 8 characters: groups whose 4 responses all reach it (or all
    # score the same) carry no signal and are replaced by groups of freshly sampled prompts
    t = make_trainer(dirs, "algo=dapo", "rollout.batch_size=4", f"reward.functions={dirs / 'rewards.py'}:length_bonus",
                     "rollout.truncated=keep", "algo.max_sampling_rounds=2", reward_model=False)
    scored, stats = t.collect([0, 1, 2, 3], 1)
    _, std, _ = __import__("ppo_rlhf.algo.advantages", fromlist=["group_moments"]).group_moments(
        scored.score, scored.groups)
    assert (std > 0).all()
    assert stats["rollout/sampling_rounds"] >= 1 and stats["rollout/kept_groups"] <= 4


def test_reward_functions_without_a_reward_model(dirs):
    t = make_trainer(dirs, f"reward.functions={dirs / 'rewards.py'}:length_bonus", reward_model=False)
    assert t.reward_model is None and t.value_model is not None
    assert (t.name, t.command) == ("ppo", "rl")  # named for the algorithm; resumed with `ppo-rlhf rl`
    m = iterate(t)
    assert 0 <= m["reward_fn/length_bonus"] <= 1
    assert "objective/rm_score" not in m  # no reward model: no RM score (it was logged as 0)


def test_reward_functions_as_python_callables(dirs):
    cfg = build_config(PPOConfig, overrides=[
        f"policy={dirs / 'sft'}", f"prompts_file={dirs / 'prompts.jsonl'}", f"out_dir={dirs / 'out'}",
        "rollout.batch_size=4", "run.tensorboard=false", "algo=rloo"])

    def constant(prompts, responses, **_):
        return [0.5] * len(prompts)

    t = RLTrainer(cfg, torch.device("cpu"), reward_functions=[constant])
    assert iterate(t)["reward_fn/constant"] == 0.5


def test_no_reward_at_all_is_a_clear_error(dirs):
    with pytest.raises(Exception, match="reward_model or reward.functions"):
        make_trainer(dirs, reward_model=False)


def test_group_estimators_refuse_one_sample_per_prompt(dirs):
    with pytest.raises(Exception, match="samples_per_prompt"):
        make_trainer(dirs, "algo=grpo", "algo.samples_per_prompt=1")
    with pytest.raises(Exception, match="needs a value model"):
        make_trainer(dirs, "algo.critic=false")


def test_kl_in_the_loss_is_a_loss_term_and_not_in_the_reward(dirs):
    t = make_trainer(dirs, "algo.kl_in=loss", "reward.kl_estimator=k3")
    m = iterate(t)
    assert "loss/kl" in m and m["objective/rlhf_reward"] == pytest.approx(m["objective/score"], abs=1e-5)


def test_ptx_and_entropy_losses_are_used(dirs):
    t = make_trainer(dirs, "loss.ptx_coef=2.0", f"ptx_file={dirs / 'text.jsonl'}", "loss.entropy_coef=0.01")
    m = iterate(t)
    assert m["loss/ptx"] > 0 and "loss/entropy" in m


def test_adaptive_kl_controller_moves_beta(dirs):
    t = make_trainer(dirs, "reward.kl_control=adaptive", "reward.kl_coef=0.1", "reward.kl_target=0.001",
                     "reward.kl_horizon=100")
    m = iterate(t)
    e = max(-0.2, min(0.2, m["objective/kl"] / 0.001 - 1))
    assert t.kl_ctl.value == pytest.approx(0.1 * (1 + e * 8 / 100))


def test_critic_pretraining_fits_the_value_model_on_fixed_rollouts(dirs):
    t = make_trainer(dirs, "train.critic_pretrain_rollouts=2", "train.critic_pretrain_epochs=3")
    before_p, before_v = snapshot(t.policy), snapshot(t.value_model)
    m = t.pretrain_critic()
    assert not changed(before_p, t.policy) and changed(before_v, t.value_model)
    assert m["critic_pretrain/explained_variance_after"] > m["critic_pretrain/explained_variance_before"]


def test_value_model_warm_start_from_a_saved_value_model(dirs, tmp_path):
    t = make_trainer(dirs)
    iterate(t)
    save_model(t.value_model, t.tokenizer, tmp_path / "value_model")
    warm = make_trainer(dirs, f"train.value_init={tmp_path / 'value_model'}")
    for a, b in zip(t.value_model.parameters(), warm.value_model.parameters()):
        torch.testing.assert_close(a, b)


def test_missing_eos_penalty_overlong_punishment_and_clip():
    cfg = build_config(PPOConfig, overrides=["rollout.missing_eos_penalty=-1", "reward.score_clip=2"])
    ids = torch.tensor([[5, 9, 0], [5, 6, 7]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    trunc = truncated_rows(ids, mask, eos_id=9)
    assert trunc.tolist() == [False, True]
    lengths = mask.sum(1)
    assert shape_scores(torch.tensor([5.0, 0.3]), trunc, lengths, cfg, 3, None).tolist() == [2.0, -1.0]
    cfg.rollout.truncated = "keep"
    assert shape_scores(torch.tensor([0.5, 0.3]), trunc, lengths, cfg, 3, None).tolist() == pytest.approx([0.5, 0.3])
    # DAPO: max 3, buffer 2 -> lengths 2 and 3 are 1/2 and 2/2 of the way into the buffer
    cfg.rollout.overlong_buffer, cfg.rollout.overlong_penalty = 2, 1.0
    assert shape_scores(torch.tensor([0.5, 0.3]), trunc, lengths, cfg, 3, None).tolist() == pytest.approx([0.0, -0.7])


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
    iterate(t, 1)  # critic warm-up: only the head moves
    assert not changed(trunk, t.policy)
    assert any(not torch.equal(head[n], p) for n, p in t.value_model.named_parameters() if n in head)
    iterate(t, 2)  # then the shared trunk learns from both losses
    assert changed(trunk, t.policy)


def test_rollouts_of_different_shapes_concatenate_after_padding(dirs):
    from ppo_rlhf.rollout import pad_scored

    t = make_trainer(dirs, "rollout.batch_size=4")
    a, _ = t.collect([0, 1, 2, 3], 1)
    b = pad_scored(a, a.prompt_len + 2, a.response_mask.size(1) + 3, t.tokenizer.pad_token_id)
    assert b.prompt_len == a.prompt_len + 2 and b.response_mask.size(1) == a.response_mask.size(1) + 3
    R = a.response_mask.size(1)
    assert torch.equal(b.sequences[:, 2:2 + a.sequences.size(1)], a.sequences)
    assert torch.equal(b.response_mask[:, :R], a.response_mask) and not b.response_mask[:, R:].any()
    assert torch.equal(b.logprobs[:, :R], a.logprobs)
    from ppo_rlhf.rollout import make_experience
    e1 = make_experience(a, t.cfg, 0.5, t.max_new_tokens)
    e2 = make_experience(b, t.cfg, 0.5, t.max_new_tokens)
    torch.testing.assert_close(e2.advantages[:, :R], e1.advantages)


def test_trpo_run_saves_a_model_with_tied_weights(dirs, tmp_path):
    from ppo_rlhf.stages.rl import run_rl

    cfg = build_config(PPOConfig, overrides=[
        f"policy={dirs / 'sft'}", f"reward_model={dirs / 'rm'}", f"prompts_file={dirs / 'prompts.jsonl'}",
        f"out_dir={tmp_path / 'trpo'}", "algo=trpo", "rollout.batch_size=4", "train.updates=2",
        "run.tensorboard=false", "run.eval_every=0", "algo.trpo.cg_iters=2"])
    run_rl(cfg)
    from ppo_rlhf.tokenizer import load_tokenizer

    policy = load_causal_lm(tmp_path / "trpo" / "model", load_tokenizer(tmp_path / "trpo" / "model"))
    assert policy.lm_head.weight.data_ptr() == policy.transformer.wte.weight.data_ptr()


def test_a_reward_function_that_raises_stops_the_run_and_keeps_the_last_checkpoint(dirs, tmp_path):
    from ppo_rlhf.checkpoint import CheckpointManager
    from ppo_rlhf.rewards import RewardFunctionError
    from ppo_rlhf.stages.rl import run_rl

    calls = {"n": 0}

    def flaky(prompts, responses, **_):
        calls["n"] += 1
        if calls["n"] == 3:  # the third rollout
            raise ZeroDivisionError("boom")
        return [0.0] * len(prompts)

    out = tmp_path / "run"
    cfg = build_config(PPOConfig, overrides=[
        f"policy={dirs / 'sft'}", f"prompts_file={dirs / 'prompts.jsonl'}", f"out_dir={out}",
        "rollout.batch_size=4", "train.updates=5", "run.save_every=2", "run.eval_every=0",
        "run.tensorboard=false"])
    with pytest.raises(RewardFunctionError, match="flaky"):
        run_rl(cfg, reward_functions=[flaky])
    ckpt = CheckpointManager(out, keep_last=2)
    assert ckpt.latest_valid() == ckpt.path_for(2)  # update 2's checkpoint, whole
    assert not (out / "summary.json").exists() and not (out / "model").exists()


# -- wiring: each of these failed before its fix ---------------------------------------------------
def test_dynamic_sampling_refill_groups_never_merge_with_earlier_ones(dirs, tmp_path):
    """3 training prompts and rollout.batch_size=4: a refill round holds 3 prompts, and its group
    ids used to be round * 3 + j, which collide with round 0's ids 0..3 (two prompts' samples
    merged into one group of 8, and GRPO's advantages computed over the wrong rows)."""
    from ppo_rlhf.algo.advantages import group_moments
    from ppo_rlhf.rollout import make_experience

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n"
                                                    for p in ("1+2=", "3+4=", "5+6=")))
    (tmp_path / "rewards.py").write_text(
        "def varied(prompts, responses, **_):\n"
        "    return [float(sum(map(ord, r)) % 3) if not p.startswith('1') else 0.0\n"
        "            for p, r in zip(prompts, responses)]\n")
    t = make_trainer(dirs, "algo=dapo", "rollout.batch_size=4", f"prompts_file={tmp_path / 'prompts.jsonl'}",
                     f"reward.functions={tmp_path / 'rewards.py'}:varied", "rollout.truncated=keep",
                     reward_model=False)
    scored, stats = t.collect([1, 2, 0, 1], 1)
    assert stats["rollout/sampling_rounds"] == 2  # prompt 0 ("1+2=") has no variance: refilled
    for g in scored.groups.unique():
        rows = scored.groups == g
        assert rows.sum() == 4 and scored.prompt_index[rows].unique().numel() == 1
    exp = make_experience(scored, t.cfg, t.kl_ctl.value, t.max_new_tokens)
    _, _, count = group_moments(exp.scores, exp.groups)
    assert (count == 4).all()


def test_trpo_with_the_kl_in_the_loss_is_pulled_back_by_beta(dirs):
    """TRPO's surrogate had no beta * KL term, and with algo.kl_in=loss the rollout leaves the KL
    out of the reward: kl_coef=0 and kl_coef=100 gave identical steps."""
    params = []
    for beta in (0.0, 100.0):
        t = make_trainer(dirs, "algo=trpo", "algo.kl_in=loss", f"reward.kl_coef={beta}", "rollout.batch_size=4",
                         "algo.trpo.cg_iters=3", "train.critic_warmup_updates=0")
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # a policy away from the reference, so the KL term has a gradient
            for p in t.policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        m = iterate(t)
        assert m["trpo/step_fraction"] > 0
        params.append(torch.nn.utils.parameters_to_vector(t.policy.parameters()).detach())
    assert not torch.allclose(params[0], params[1])


def test_a_greedy_baseline_is_scored_and_shaped_like_the_samples(dirs, tmp_path):
    """ReMax's greedy baseline used to skip the shaping: the overlong penalty with the samples'
    lengths (so it cancelled), no missing-EOS penalty, no dense terms, and a batch-wise
    standardisation of its own (raw r - r_greedy = -4 everywhere became 0 everywhere)."""
    from ppo_rlhf.algo.advantages import returns_to_go
    from ppo_rlhf.rollout import make_experience

    (tmp_path / "rewards.py").write_text(
        "def by_length(prompts, responses, **_):\n"
        "    return [float(len(r)) for r in responses]\n")
    t = make_trainer(dirs, "algo=remax", "rollout.batch_size=4",
                     f"reward.functions={tmp_path / 'rewards.py'}:by_length", "reward.combine=sum_then_normalize",
                     "rollout.truncated=penalty", "rollout.overlong_buffer=4", reward_model=False)
    scored = t.rollout([0, 1, 2, 3], 1, 0)
    assert scored.is_baseline.tolist() == [False, True] * 4
    # one standardisation over sampled and baseline rows together
    assert float(scored.score.mean()) == pytest.approx(0.0, abs=1e-5)
    exp = make_experience(scored, t.cfg, t.kl_ctl.value, t.max_new_tokens)
    assert exp.sequences.size(0) == 4  # the update sees the sampled rows only
    # the baseline's return, shaped on its own length and truncation, with its own KL terms
    base = scored.is_baseline
    as_samples = dataclasses.replace(t.cfg, algo=dataclasses.replace(t.cfg.algo, advantage="reinforce++"))
    again = make_experience(scored._replace(is_baseline=torch.zeros_like(base), groups=torch.arange(8)),
                            as_samples, t.kl_ctl.value, t.max_new_tokens)
    base_return = again.rewards[base].sum(1)
    expected = returns_to_go(again.rewards[~base], again.response_mask[~base], 1.0) - \
        base_return[:, None] * again.response_mask[~base]
    torch.testing.assert_close(exp.advantages, expected * exp.loss_mask)


def test_meaningless_algorithm_combinations_are_refused(dirs):
    with pytest.raises(Exception, match="does not use a value model"):
        make_trainer(dirs, "algo=grpo", "algo.critic=true")
    with pytest.raises(Exception, match=r"loss\.cispo\.\* is set, but algo.policy_loss=ppo_clip"):
        make_trainer(dirs, "loss.cispo.weight_max=2")
    with pytest.raises(Exception, match="train.target_kl"):
        make_trainer(dirs, "algo=trpo", "train.target_kl=0.1")


# -- experience replay and importance sampling ------------------------------------------------------
def test_replay_takes_replay_ratio_steps_and_reweights_only_stale_rows(dirs):
    t = make_trainer(dirs, "algo.replay_ratio=1.5", "train.ppo_epochs=1", "train.num_minibatches=2",
                     "loss.is_correction=tis", "loss.is_cap=2")
    first = iterate(t, 1)
    # iteration 1: the buffer holds only fresh rows, so every IS weight is exactly 1
    assert first["train/optimizer_steps"] == 3 and first["replay/stale_rows_used"] == 0
    assert first["is/weight_mean"] == 1.0 and first["is/weight_max"] == 1.0 and first["is/clipped_frac"] == 0.0
    second = iterate(t, 2)  # 1.5 * 2 = 3 steps an iteration
    assert second["train/optimizer_steps"] == 3 and second["replay/rows"] == 16
    assert second["replay/stale_rows_used"] > 0 and second["is/weight_max"] != 1.0
    assert 0.0 < second["is/weight_mean"] <= 2.0 and second["is/weight_max"] <= 2.0


def test_on_fresh_rows_every_is_correction_gives_the_uncorrected_update(dirs):
    """The first update of a run sees only fresh rows: pi_prox = pi_behaviour, the weights are 1,
    and the parameters after it are those of the run without any correction."""
    results = []
    for mode in ("none", "tis", "mis", "seq_mask", "is"):
        t = make_trainer(dirs, f"loss.is_correction={mode}")
        iterate(t)
        results.append(torch.nn.utils.parameters_to_vector(t.policy.parameters()).detach())
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_replay_refuses_what_it_cannot_do(dirs):
    with pytest.raises(Exception, match="replay needs a loss of update kind"):
        make_trainer(dirs, "algo=trpo", "algo.replay_ratio=2", "train.ppo_epochs=1")
    with pytest.raises(Exception, match="train.ppo_epochs must stay 1"):
        make_trainer(dirs, "algo.replay_ratio=2")
    with pytest.raises(Exception, match="replay_capacity must hold at least one rollout"):
        make_trainer(dirs, "algo.replay_ratio=2", "train.ppo_epochs=1", "algo.replay_capacity=4")


def test_reward_normalisation_is_on_by_default_only_when_functions_are_the_whole_reward():
    from ppo_rlhf.stages.rl import normalizes_scores

    fns = build_config(PPOConfig, overrides=["reward.functions=ppo_rlhf.tasks.arithmetic:gold"])
    with_rm = build_config(PPOConfig, overrides=["reward_model=run/reward/model",
                                                 "reward.functions=ppo_rlhf.tasks.arithmetic:gold"])
    assert fns.reward.normalize is None and normalizes_scores(fns)
    assert not normalizes_scores(with_rm)  # the RM stage standardised its scores already
    assert not normalizes_scores(build_config(PPOConfig, overrides=["reward.functions=m:f", "reward.normalize=false"]))
    assert normalizes_scores(build_config(PPOConfig, overrides=["reward_model=rm", "reward.normalize=true"]))
