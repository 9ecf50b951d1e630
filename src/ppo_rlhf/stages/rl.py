"""Stage 3, RL: optimise the policy against the reward model and/or reward functions with a KL
penalty to the SFT model. The algorithm is a declaration (`algo`, PPO by default):

    ppo-rlhf ppo policy=run/sft/model reward_model=run/reward/model \
        prompts_file=data/prompts_train.jsonl eval_prompts_file=data/prompts_eval.jsonl \
        task=arithmetic out_dir=run/ppo
    ppo-rlhf rl algo=grpo ...            # or rloo, reinforce++, remax, trpo, gspo, dapo, ...

Each iteration:
1. sample `algo.samples_per_prompt` responses to each prompt of the batch (pi_theta is pi_old);
2. score them: old and reference log-probs, values (with a critic), the sequence score from the
   reward model and/or reward functions; gather every rank's rows in global order;
3. `rollout.make_experience`: shaped scores, per-token rewards (with -beta*KL_t when the KL is in
   the reward), the registered advantage estimator `ADVANTAGES[algo.advantage]`, whitening;
4. the update the registered policy loss `POLICY_LOSSES[algo.policy_loss]` declares: minibatch
   optimizer steps ("gradient") or one trust-region step (`algo.trpo.trust_region_step`), the loss
   aggregated by `AGGREGATIONS[algo.aggregation]`; the value model's steps alongside.
What an estimator or loss needs (a critic, groups, a baseline response, a trust-region step) it
declares; each need has one generic path here. The math lives in `ppo_rlhf.algo`; this file is the
loop and names no algorithm.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import distributed as dist
from .. import onednn
from ..algo.advantages import ADVANTAGES, RunningMeanStd, explained_variance, group_moments, masked_mean
from ..algo.kl import kl_penalty
from ..algo.kl_control import make_kl_controller
from ..algo.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    REPLAY_KINDS,
    PolicyLossOutput,
    PolicyLossParams,
    lm_loss,
    token_mean_weights,
    value_loss,
)
from ..algo.off_policy import ISOutput, is_corrected
from ..algo.trpo import trust_region_step
from ..config import PPOConfig, to_dict
from ..data.collate import pad_left, pad_right, position_ids_from_mask
from ..data.encode import check_token_ids, encode_prompts, encode_texts
from ..data.jsonl import prompt_text, read_prompts, read_texts
from ..errors import UserError
from ..generation import response_logprobs, response_values, truncate_logits
from ..guards import NonFiniteGuard
from ..metrics import PhaseTimer, write_summary
from ..models import (
    apply_lora,
    check_same_tokenizer,
    disable_dropout,
    fold_reward_normalisation,
    load_causal_lm,
    load_scalar_model,
    save_model,
)
from ..replay import ReplayBuffer, replay_plan
from ..rewards import RewardFunctions
from ..rollout import (
    Experience,
    Reference,
    Rollout,
    Scored,
    Scorer,
    gather_scored,
    group_ids,
    make_experience,
    pad_responses,
    pad_scored,
    sample,
    select_rows,
    sequence_kl,
    shape_scores,
    truncated_rows,
    with_baselines,
)
from ..tasks import get_task
from ..tokenizer import load_tokenizer
from . import common
from .evaluate import decode_responses, evaluate_sampled_and_greedy, load_eval_prompts
from .loop import StageLoop, StepContext, StepResult
from .sac_update import SACParams, SoftQCritics, sac_update


def minibatch_indices(n_groups: int, group_size: int, num_minibatches: int,
                      generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled split of the rows into num_minibatches parts whose group counts differ by at
    most one; a group (the group_size consecutive rows of one prompt) is never split."""
    perm = torch.randperm(n_groups, generator=generator)
    offsets = torch.arange(group_size)
    return [(chunk[:, None] * group_size + offsets).reshape(-1)
            for chunk in perm.tensor_split(num_minibatches) if chunk.numel()]


def replay_capacity(cfg: PPOConfig) -> int:
    """Rows the replay buffer keeps: algo.replay_capacity, else 4 rollouts."""
    return cfg.algo.replay_capacity or 4 * cfg.rollout.batch_size * cfg.algo.samples_per_prompt


class LossStats(NamedTuple):
    """One micro-batch's loss terms and diagnostics (0-d tensors), each already weighted by the
    micro-batch's share of the minibatch, so summing the micro-batches (and ranks) gives the
    minibatch's values; the last `N_MAX` fields (`ratio_max`, `is_weight_max`) combine by max."""

    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor
    ptx: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    value_clipfrac: torch.Tensor
    is_weight: torch.Tensor  # mean importance-sampling weight (1 on fresh rows)
    is_clipped: torch.Tensor  # fraction of tokens whose IS weight was capped or masked
    ratio_max: torch.Tensor
    is_weight_max: torch.Tensor

    N_MAX = 2

    @staticmethod
    def zeros() -> LossStats:
        z, low = torch.zeros((), dtype=torch.float64), torch.tensor(float("-inf"), dtype=torch.float64)
        return LossStats(*([z] * (len(LossStats._fields) - LossStats.N_MAX)), *([low] * LossStats.N_MAX))

    def __add__(self, other: LossStats) -> LossStats:  # type: ignore[override]
        k = self.N_MAX
        summed = [a.double() + b.double() for a, b in zip(self[:-k], other[:-k])]
        return LossStats(*summed, *(torch.maximum(a.double(), b.double()) for a, b in zip(self[-k:], other[-k:])))

    def all_reduce(self) -> LossStats:
        k = self.N_MAX
        summed = dist.all_reduce_sum(torch.stack([t.double() for t in self[:-k]]))
        maxed = dist.all_reduce_max(torch.stack([t.double() for t in self[-k:]]))
        return LossStats(*summed.unbind(), *maxed.unbind())


class PolicyTerms(NamedTuple):
    """The policy objective of some rows, per token (B, R): `losses` (IS-weighted, with the KL term
    when it is in the loss) carry the gradient; the loss's own output, the KL term (None when the KL
    is in the reward) and the IS weights are for the stats."""

    losses: torch.Tensor
    loss_out: PolicyLossOutput
    kl: torch.Tensor | None
    is_weights: ISOutput


class StepStats(NamedTuple):
    """One optimizer step: the reduced loss stats and the gradient norms."""

    losses: LossStats
    policy_grad_norm: float
    value_grad_norm: float


def update_metrics(steps: Sequence[StepStats], policy: bool, value: bool) -> dict[str, float]:
    """The update's logged metrics: each step's stats averaged over the steps (ratio_max: max);
    only the policy's or the value model's when only one of them was updated."""
    if not steps:
        return {}
    n = len(steps)
    # one host sync for the whole update (each float() would be one on an accelerator)
    k = LossStats.N_MAX
    table = torch.stack([torch.stack([t.double() for t in s.losses]) for s in steps])
    loss = LossStats(*table[:, :-k].mean(0).tolist(), *table[:, -k:].amax(0).tolist())
    out = {"loss/total": loss.loss}
    if policy:
        out.update({"loss/policy": loss.policy, "loss/kl": loss.kl, "loss/entropy": loss.entropy,
                    "loss/ptx": loss.ptx, "policy/clipfrac": loss.clipfrac, "policy/approx_kl": loss.approx_kl,
                    "policy/ratio_mean": loss.ratio_mean, "policy/ratio_max": loss.ratio_max,
                    "policy/grad_norm": sum(s.policy_grad_norm for s in steps) / n,
                    "is/weight_mean": loss.is_weight, "is/weight_max": loss.is_weight_max,
                    "is/clipped_frac": loss.is_clipped})
    if value:
        out.update({"loss/value": loss.value, "value/clipfrac": loss.value_clipfrac,
                    "value/grad_norm": sum(s.value_grad_norm for s in steps) / n})
    return out


@dataclass
class Prompts:
    """The training prompts: token ids, text, row fields (for reward functions) and file lines."""

    ids: list[list[int]]
    texts: list[str]
    fields: list[dict]


class RLTrainer:
    """The policy, reference, reward model / functions and value model with their optimisers and
    controllers; `step()` is one iteration (the `Stage` of loop.py)."""

    command, unit = "rl", "update"
    work = "rl"  # what run.dtype=auto weighs (precision.WORKS)

    def __init__(self, cfg: PPOConfig, device: torch.device, reward_functions: Sequence[Callable] | None = None):
        self.name = cfg.algo.name  # what runs: the console prefix and the metrics' stage
        self.cfg, self.device = cfg, device
        algo = cfg.algo
        self.estimator = ADVANTAGES[algo.advantage]
        self.policy_loss = POLICY_LOSSES[algo.policy_loss]
        self._check(cfg, reward_functions)
        tok = self.tokenizer = load_tokenizer(cfg.policy)
        self.task = get_task(cfg.task) if cfg.task else None
        self.max_new_tokens = cfg.rollout.max_new_tokens or (self.task.default_max_new_tokens if self.task else 32)
        self.dtype = common.compute_dtype(cfg.run, device, cfg.policy, work=self.work)
        self.total_steps = cfg.train.updates

        # -- models ---------------------------------------------------------------------------
        self.policy = load_causal_lm(cfg.policy, tok).to(device)
        self.use_lora = cfg.model.lora_r > 0
        if self.use_lora:
            self.policy = apply_lora(self.policy, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout)
            self.reference = Reference(lora_policy=self.policy)
        else:
            frozen = load_causal_lm(cfg.policy, tok).to(device).requires_grad_(False)
            self.reference = Reference(model=frozen)
        self.reward_model = None
        if cfg.reward_model:
            check_same_tokenizer(cfg.policy, "policy", cfg.reward_model, "reward_model")
            self.reward_model = load_scalar_model(cfg.reward_model, tok).to(device).requires_grad_(False)
        specs = [s.strip() for s in cfg.reward.functions.split(",") if s.strip()]
        weights = [float(w) for w in cfg.reward.weights.split(",") if w.strip()] or None
        fns = RewardFunctions([*specs, *(reward_functions or [])], weights) if specs or reward_functions else None
        self.scorer = Scorer(cfg, tok, self.reward_model, fns)
        self.value_model = self._value_model(tok) if algo.critic else None
        self.q_critics = None  # the soft_actor_critic update's own critics (made below, after FSDP)
        for m in (self.policy, self.reference.model, self.reward_model, self.value_model):
            if m is not None:
                disable_dropout(m)
                m.eval()

        # -- data -----------------------------------------------------------------------------
        examples, _ = read_prompts(cfg.prompts_file)
        ids, trunc = encode_prompts(tok, examples, cfg.max_prompt_len)
        check_token_ids(ids, self.policy.config.vocab_size, cfg.prompts_file)
        self.prompts = Prompts(ids, [prompt_text(e) for e in examples], [e.fields for e in examples])
        self.truncation: list[str] = []  # reported once, before the first update
        if trunc.prompts_truncated or trunc.dropped:
            self.truncation.append(f"{cfg.prompts_file}: {trunc.describe()}")
        self.eval_prompts = None
        if cfg.eval_prompts_file:
            self.eval_prompts = load_eval_prompts(cfg.eval_prompts_file, tok, cfg.max_prompt_len, cfg.eval_samples)
        self.ptx_ids: list[list[int]] = []
        if cfg.loss.ptx_coef > 0:
            texts, _ = read_texts(cfg.ptx_file)
            self.ptx_ids, ptx_trunc = encode_texts(tok, texts, cfg.max_prompt_len + self.max_new_tokens,
                                                   knobs="max_prompt_len + rollout.max_new_tokens")
            if ptx_trunc.texts_truncated or ptx_trunc.dropped:
                self.truncation.append(f"{cfg.ptx_file}: {ptx_trunc.describe()}")

        # -- wrappers and optimisers (after FSDP swaps the parameters) ------------------------
        self.policy_ddp = dist.wrap_model(self.policy, device, cfg.run)
        self.value_ddp = dist.wrap_model(self.value_model, device, cfg.run) if self.value_model is not None else None
        for frozen in (self.reference.model, self.reward_model):
            if frozen is not None:
                dist.wrap_model(frozen, device, cfg.run)
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        per_update = (math.ceil(algo.replay_ratio * cfg.train.num_minibatches) if algo.replay_ratio
                      else cfg.train.ppo_epochs * cfg.train.num_minibatches)
        steps = cfg.train.updates * per_update
        self.policy_opt = common.make_optimizer(self.policy_params, cfg.optim)
        self.policy_sched = common.make_scheduler(self.policy_opt, cfg.optim, steps)
        self.schedules = [common.Schedule(self.policy_opt, self.policy_sched, cfg.optim.lr)]
        self.value_params: list[torch.nn.Parameter] = []
        if self.value_model is not None:
            trunk = {id(p) for p in self.policy.parameters()}  # a policy_head value model shares it
            self.value_params = [p for p in self.value_model.parameters() if p.requires_grad and id(p) not in trunk]
            value_lr = cfg.train.value_lr if cfg.train.value_lr is not None else cfg.optim.lr
            self.value_opt = common.make_optimizer(self.value_params, cfg.optim, lr=value_lr)
            self.value_sched = common.make_scheduler(self.value_opt, cfg.optim, steps)
            self.schedules.append(common.Schedule(self.value_opt, self.value_sched, value_lr))
        if self.policy_loss.update == "soft_actor_critic":
            self.q_critics = SoftQCritics(cfg.policy, tok, device, cfg.run, cfg.optim, cfg.loss.sac, steps)
        self.kl_ctl = make_kl_controller(cfg.reward.kl_control, cfg.reward.kl_coef, cfg.reward.kl_target,
                                         cfg.reward.kl_horizon)
        self.running = RunningMeanStd() if normalizes_scores(cfg) else None
        self.loss_params = PolicyLossParams(cfg.loss.clip_eps, cfg.loss.clip_eps_high if cfg.loss.clip_eps_high
                                            is not None else cfg.loss.clip_eps, cfg.loss.dual_clip_c,
                                            getattr(cfg.loss, algo.policy_loss, None))
        # rows per group in a rollout: the samples, then the baseline response if the estimator has one
        self.group_rows = algo.samples_per_prompt + (self.estimator.baseline is not None)
        self.gen = torch.Generator(device=device).manual_seed(cfg.run.seed)  # seeds the global rollout
        self.shuffle_gen = torch.Generator().manual_seed(cfg.run.seed + 17)
        self.timer = PhaseTimer()
        # Experience replay (algo.replay_ratio > 0): every rank holds the same global rows and draws
        # the same minibatches from the same generator, as the on-policy update does.
        self.replay = None
        if algo.replay_ratio > 0:
            self.replay = ReplayBuffer(replay_capacity(cfg), algo.replay_staleness, pad_id=tok.pad_token_id,
                                       row_type=Experience)
        self.replay_gen = torch.Generator().manual_seed(cfg.run.seed + 29)

    # -- construction helpers ---------------------------------------------------------------------
    def _check(self, cfg: PPOConfig, reward_functions) -> None:
        algo = cfg.algo
        common.require_file(cfg.policy, "policy", "the SFT model directory (run/sft/model)")
        if not cfg.reward_model and not (cfg.reward.functions or reward_functions):
            raise UserError("reward_model or reward.functions is required: give the reward model directory "
                            "(run/reward/model), reward functions (reward.functions=module:fn), or both")
        if cfg.reward_model:
            common.require_file(cfg.reward_model, "reward_model", "the reward model directory (run/reward/model)")
        common.require_file(cfg.prompts_file, "prompts_file",
                            "a prompts JSONL: `ppo-rlhf data --task arithmetic --out DIR`")
        if cfg.loss.ptx_coef > 0:
            common.require_file(cfg.ptx_file, "ptx_file",
                                "pretraining text JSONL {\"text\"}, needed when loss.ptx_coef > 0")
            common.check_batch(cfg.loss.ptx_batch_size, 1, "loss.ptx_batch_size")
        if self.estimator.needs_values and not algo.critic:
            raise UserError(f"algo.advantage={algo.advantage} needs a value model: set algo.critic=true")
        if algo.critic and not self.estimator.needs_values:
            raise UserError(f"algo.critic=true, but algo.advantage={algo.advantage} does not use a value "
                            "model (it would be trained and never read): set algo.critic=false")
        for name, loss in POLICY_LOSSES.items():
            if loss.knobs is not None and name != algo.policy_loss and getattr(cfg.loss, name) != loss.knobs():
                raise UserError(f"loss.{name}.* is set, but algo.policy_loss={algo.policy_loss}: those options "
                                f"are read only by policy_loss={name}; remove them or choose that loss")
        if self.policy_loss.uses_advantages and not self.estimator.advantages:
            raise UserError(f"algo.policy_loss={algo.policy_loss} reads advantages, and algo.advantage="
                            f"{algo.advantage} gives none: choose an advantage estimator")
        if self.estimator.advantages and not self.policy_loss.uses_advantages:
            raise UserError(f"algo.policy_loss={algo.policy_loss} learns its own critic and ignores advantages: "
                            "set algo.advantage=none")
        kind = self.policy_loss.update
        if kind != "gradient":
            gradient_only = (("train.target_kl", cfg.train.target_kl, None), ("loss.ptx_coef", cfg.loss.ptx_coef, 0.0),
                             ("loss.entropy_coef", cfg.loss.entropy_coef, 0.0))
            for key, value, off in gradient_only:
                if value != off:
                    raise UserError(f"{key} is used by gradient-step losses; algo.policy_loss={algo.policy_loss} "
                                    f"takes {kind} steps, which do not read it: remove {key}")
        if kind == "soft_actor_critic":
            if algo.replay_ratio <= 0:
                raise UserError(f"algo.policy_loss={algo.policy_loss} learns off-policy from a replay buffer: "
                                "set algo.replay_ratio > 0 (e.g. 2) and train.ppo_epochs=1")
            if algo.kl_in != "loss":
                raise UserError(f"algo.policy_loss={algo.policy_loss} has the KL to the reference in its soft value "
                                "(exact over the vocabulary): set algo.kl_in=loss, or it is counted twice")
        if self.estimator.needs_groups and algo.samples_per_prompt < 2:
            raise UserError(f"algo.advantage={algo.advantage} compares the responses to one prompt: "
                            "set algo.samples_per_prompt to 2 or more")
        if algo.dynamic_sampling and algo.samples_per_prompt < 2:
            raise UserError("algo.dynamic_sampling drops groups without reward variance: set "
                            "algo.samples_per_prompt to 2 or more")
        if cfg.train.value_model == "policy_head" and algo.critic and (
                cfg.model.lora_r > 0 or dist.world_size() > 1 or cfg.run.fsdp):
            raise UserError("train.value_model=policy_head needs one process and no LoRA; "
                            "use train.value_model=separate")
        common.check_batch(cfg.rollout.batch_size, 1, "rollout.batch_size")
        if algo.replay_ratio > 0:
            if self.policy_loss.update not in REPLAY_KINDS:
                raise UserError(f"algo.replay_ratio: algo.policy_loss={algo.policy_loss} takes one "
                                f"{self.policy_loss.update} step on its own rollout; replay needs a loss of "
                                f"update kind {' or '.join(REPLAY_KINDS)}")
            if replay_capacity(cfg) < cfg.rollout.batch_size * algo.samples_per_prompt:
                raise UserError("algo.replay_capacity must hold at least one rollout "
                                f"(rollout.batch_size * algo.samples_per_prompt = "
                                f"{cfg.rollout.batch_size * algo.samples_per_prompt} rows)")
            if cfg.train.ppo_epochs != 1:
                raise UserError("algo.replay_ratio sets how often each row is used (replay_ratio * "
                                "train.num_minibatches steps per iteration); train.ppo_epochs must stay 1 with it")
        rows = cfg.rollout.batch_size * algo.samples_per_prompt // dist.world_size()
        if rows < cfg.train.num_minibatches * cfg.train.grad_accum:
            raise UserError("rollout.batch_size * algo.samples_per_prompt per rank must be at least "
                            f"train.num_minibatches * train.grad_accum ({cfg.train.num_minibatches} * "
                            f"{cfg.train.grad_accum})")
        if cfg.rollout.batch_size < cfg.train.num_minibatches:
            raise UserError(f"rollout.batch_size ({cfg.rollout.batch_size} prompts) must be at least "
                            f"train.num_minibatches ({cfg.train.num_minibatches}): a minibatch holds whole groups")

    def _value_model(self, tok):
        """V_phi: from train.value_init, else the RM (its normalisation folded into the head, so the
        values start on the scale of the rewards), else the policy with a new zero head."""
        cfg = self.cfg
        if cfg.train.value_init:
            common.require_file(cfg.train.value_init, "train.value_init", "a saved value model directory")
            check_same_tokenizer(cfg.policy, "policy", cfg.train.value_init, "train.value_init")
            model = load_scalar_model(cfg.train.value_init, tok)
        elif cfg.reward_model:
            model = load_scalar_model(cfg.reward_model, tok)
        else:
            model = load_scalar_model(cfg.policy, tok, init_from_causal_lm=True)
        fold_reward_normalisation(model)  # values start on the scale of the (normalised) scores
        model = model.to(self.device)
        if cfg.train.value_model == "policy_head":
            # V_phi is a head on the policy's own trunk: the trunk learns from both losses and is
            # stepped by the policy optimizer; the value optimizer owns the head.
            setattr(model, model.base_model_prefix, self.policy.base_model)
        return model

    # -- the Stage protocol (loop.py) -------------------------------------------------------------
    def state(self) -> dict:
        s = {"policy": self.policy, "policy_optimizer": self.policy_opt, "policy_scheduler": self.policy_sched,
             "kl_controller": self.kl_ctl, "generator": self.gen.get_state(),
             "shuffle_generator": self.shuffle_gen.get_state(),
             "running": self.running.state_dict() if self.running else None}
        if self.value_model is not None:
            s.update(value_model=self.value_model, value_optimizer=self.value_opt, value_scheduler=self.value_sched)
        if self.replay is not None:
            s.update(replay=self.replay, replay_generator=self.replay_gen.get_state())
        if self.q_critics is not None:
            s.update(self.q_critics.state())
        return s

    def load(self, values: dict) -> None:
        self.gen.set_state(values["generator"])
        self.shuffle_gen.set_state(values["shuffle_generator"])
        if self.replay is not None:
            self.replay_gen.set_state(values["replay_generator"])
        if self.running is not None and values.get("running"):
            self.running.load_state_dict(values["running"])

    def evaluate(self, step: int) -> StepResult:
        if self.eval_prompts is None:
            return StepResult({})
        cfg = self.cfg
        with dist.full_params(self.policy, self.reward_model, self.reference.model):
            res = evaluate_sampled_and_greedy(self.policy, self.tokenizer, self.eval_prompts, task=cfg.task,
                                              device=self.device, reward_model=self.reward_model,
                                              reference=self.reference, max_new_tokens=self.max_new_tokens,
                                              temperature=cfg.rollout.temperature, seed=cfg.run.seed + 99,
                                              sample_rows=cfg.sample_rows)
        return StepResult({f"eval/{k}": v for k, v in res.items() if isinstance(v, float)}, samples=res["samples"])

    def step(self, ctx: StepContext) -> StepResult:
        """Iteration `ctx.step`: roll out the prompt batch, score, update (see the module docstring)."""
        cfg = self.cfg
        self.timer.reset()
        t0 = time.time()
        rows = common.global_batch(len(self.prompts.ids), cfg.rollout.batch_size, cfg.run.seed, ctx.step - 1)
        scored, sampling = self.collect(rows, ctx.step)
        beta = self.kl_ctl.value
        exp = make_experience(scored, cfg, beta, self.max_new_tokens, self.running)
        ev_before = explained_variance(exp.values, exp.returns, exp.response_mask) if self.value_model else None
        with self.timer("train"):
            train = self.update(exp, ctx)
        seq_kl = sequence_kl(exp.logprobs, exp.ref_logprobs, exp.response_mask)
        mean_kl = seq_kl.mean().item()
        self.kl_ctl.update(mean_kl, exp.sequences.size(0))
        m, samples = self.rollout_metrics(exp, beta)
        m["objective/kl"] = mean_kl
        m.update(sampling)
        if self.value_model is not None:
            m["value/explained_variance"] = ev_before
            m["value/explained_variance_after"] = self.explained_variance_after(exp)
        m.update(train)
        dt = time.time() - t0
        n_tokens = exp.attention_mask.sum().item()
        m.update(self.timer.totals())
        m.update({"perf/tokens_per_s": n_tokens / dt, "perf/seconds_per_update": dt,
                  "perf/samples": ctx.step * cfg.rollout.batch_size * cfg.algo.samples_per_prompt,
                  "train/lr": self.policy_sched.get_last_lr()[0], "train/skipped_steps": ctx.guard.skipped_total})
        if self.device.type == "cuda":
            m["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        progress = {"kl": f"{mean_kl:.2f}", "score": f"{m['objective/score']:.2f}"}
        if "objective/gold_reward" in m:
            progress["gold"] = f"{m['objective/gold_reward']:.2f}"
        return StepResult(m, progress, samples)

    # -- rollout ----------------------------------------------------------------------------------
    def collect(self, rows: list[int], step: int) -> tuple[Scored, dict[str, float]]:
        """The scored global rollout of the prompts `rows`; with dynamic sampling, groups whose
        scores are all equal are dropped and more prompts sampled (a pure function of (seed, step,
        round), so resume stays exact) until the batch is full or max_sampling_rounds is reached.
        Group ids count the groups sampled so far, so a refill round's never repeat an earlier one's."""
        algo = self.cfg.algo
        k = self.group_rows
        scored = self.rollout(rows, step, 0)
        if not algo.dynamic_sampling:
            return scored, {}
        want = len(rows)
        kept, rounds, seen = [], 0, 0
        while True:
            shaped = shape_scores(scored.score, scored.truncated, scored.response_mask.sum(1), self.cfg,
                                  self.max_new_tokens, self.running)
            sampled = ~scored.is_baseline
            _, std, _ = group_moments(shaped[sampled], scored.groups[sampled])
            keep_rows = torch.isin(scored.groups, scored.groups[sampled][std > 0])
            seen += scored.sequences.size(0) // k
            kept.append(select_rows(scored, keep_rows))
            rounds += 1
            have = sum(part.sequences.size(0) // k for part in kept)
            if have >= want or rounds >= algo.max_sampling_rounds:
                break
            g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step * 7919 + rounds)
            extra = torch.randperm(len(self.prompts.ids), generator=g)[:want].tolist()
            scored = self.rollout(extra, step, seen)
        prompt_len = max(part.prompt_len for part in kept)
        response_len = max(part.response_mask.size(1) for part in kept)
        kept = [pad_scored(part, prompt_len, response_len, self.tokenizer.pad_token_id) for part in kept]
        merged = Scored(*(torch.cat(parts)[: want * k] for parts in zip(*kept)))
        if merged.sequences.size(0) == 0:
            raise UserError(f"algo.dynamic_sampling: every group of {rounds} rollouts had equal rewards "
                            "(no learning signal); raise algo.max_sampling_rounds or turn dynamic sampling off")
        return merged, {"rollout/kept_groups": merged.sequences.size(0) / k, "rollout/sampled_groups": seen,
                        "rollout/sampling_rounds": rounds}

    def rollout(self, rows: list[int], step: int, first_group: int) -> Scored:
        """Sample and score the global prompt batch `rows`: this rank samples its prompts (`dist.shard`),
        n responses each from per-row streams seeded from a per-update seed, so the rollout does not
        depend on the world size, plus the baseline response when the estimator declares one; the
        scored rows are gathered in global order, groups together, numbered from `first_group`."""
        cfg, tok, dev = self.cfg, self.tokenizer, self.device
        n = cfg.algo.samples_per_prompt
        mine = dist.shard(range(len(rows)))
        width = max(len(self.prompts.ids[i]) for i in rows)  # one prompt width on all ranks
        prompt_ids, prompt_mask = pad_left([self.prompts.ids[rows[j]] for j in mine], tok.pad_token_id, width)
        prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
        base_seed = int(torch.randint(2**62, (1,), generator=self.gen, device=self.gen.device))
        seeds = [base_seed + j * n + k for j in mine for k in range(n)]
        with self.timer("generate"), common.autocast(dev, self.dtype), dist.full_params(self.policy):
            ro = sample(self.policy, prompt_ids, prompt_mask, cfg, self.max_new_tokens, tok.eos_token_id,
                        tok.pad_token_id, seeds)
            is_baseline = torch.zeros(ro.response_ids.size(0), dtype=torch.bool, device=dev)
            if self.estimator.baseline is not None:
                base = sample(self.policy, prompt_ids, prompt_mask, cfg, self.max_new_tokens, tok.eos_token_id,
                              tok.pad_token_id, [], greedy=self.estimator.baseline == "greedy")
                ro, is_baseline = with_baselines(ro, base, n, tok.pad_token_id)
            length = int(dist.all_reduce_max(torch.tensor(ro.response_ids.size(1))))
            ro = pad_responses(ro, length, tok.pad_token_id)
        k = self.group_rows
        with self.timer("score"), common.autocast(dev, self.dtype):
            scored = self.score(ro, [rows[j] for j in mine for _ in range(k)], [first_group + j for j in mine],
                                is_baseline)
        return gather_scored(scored, k)

    @torch.no_grad()
    def score(self, ro: Rollout, prompt_rows: list[int], groups: list[int], is_baseline: torch.Tensor) -> Scored:
        """Old/reference log-probs, values and the sequence score of this rank's rows, sampled and
        baseline rows alike (one call, so batch-wise score normalisation sees them together);
        `prompt_rows` (one per row) index the training prompts, `groups` (one per prompt) name the groups."""
        cfg, tok = self.cfg, self.tokenizer
        P = ro.prompt_ids.size(1)
        sequences = torch.cat([ro.prompt_ids, ro.response_ids], 1)
        attention_mask = torch.cat([ro.prompt_mask, ro.response_mask], 1)
        temp = cfg.rollout.temperature
        logprobs = ro.logprobs
        # bf16 sampling kernels and the training forward round differently (up to ~0.04 nats): the
        # old log-probs come from the training forward, so the first ratios are exactly 1. A greedy
        # baseline's sampling log-probs are at temperature 1: its rows are recomputed at the rollout's.
        redo = torch.ones_like(is_baseline) if self.dtype == "bfloat16" else is_baseline
        if bool(redo.any()):
            lp, _ = response_logprobs(self.policy, sequences[redo], attention_mask[redo], P, temperature=temp,
                                      top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p)
            logprobs = logprobs.clone()
            logprobs[redo] = lp
        ref_logprobs = self.reference.logprobs(sequences, attention_mask, P, temp)
        values = torch.zeros_like(logprobs)
        if self.value_model is not None:
            values = response_values(self.value_model, sequences, attention_mask, P).float()
        texts = self._texts(ro)
        prompts = [self.prompts.texts[i] for i in prompt_rows]
        fields = [self.prompts.fields[i] for i in prompt_rows]
        score, dense, rm_scores, fn_scores = self.scorer(sequences, attention_mask, ro.response_mask, prompts,
                                                         texts, fields, prompt_rows)
        truncated = truncated_rows(ro.response_ids, ro.response_mask, tok.eos_token_id)
        groups = group_ids(groups, self.group_rows, sequences.device)
        return Scored(sequences, attention_mask, ro.response_mask, logprobs, ref_logprobs, values, ro.entropy,
                      score, dense, rm_scores, fn_scores, is_baseline, truncated, groups,
                      torch.as_tensor(prompt_rows, device=sequences.device))

    def _texts(self, ro: Rollout) -> list[str]:
        """The decoded responses, for the reward functions (none needed without them)."""
        if not self.scorer.names:
            return [""] * ro.response_ids.size(0)
        return decode_responses(self.tokenizer, ro.response_ids.cpu(), ro.response_mask.cpu())[0]

    def rollout_metrics(self, exp: Experience, beta: float) -> tuple[dict, list[dict]]:
        """The rollout's objective metrics and a few sample rows."""
        cfg = self.cfg
        mask = exp.response_mask
        prompt_rows = exp.prompt_index.tolist()
        m = {"objective/kl_estimator_mean": (exp.kl * mask).sum(1).mean().item(),
             "objective/rlhf_reward": exp.rewards.sum(1).mean().item(),
             **({"objective/rm_score": exp.rm_scores.mean().item()} if self.reward_model is not None else {}),
             "objective/score": exp.scores.mean().item(),
             "objective/non_score_reward": (-beta * exp.kl * mask).sum(1).mean().item(),
             "objective/entropy": masked_mean(exp.entropy, mask).item(),
             "kl_ctl/beta": beta,
             "rollout/response_length": mask.sum(1).float().mean().item(),
             "rollout/truncated_frac": exp.truncated.float().mean().item(),
             "value/mean": masked_mean(exp.values, mask).item(),
             "returns/mean": masked_mean(exp.returns, mask).item()}
        for name, col in zip(self.scorer.names, exp.function_scores.unbind(1)):
            m[f"reward_fn/{name}"] = col.mean().item()
        # Text is needed for the gold reward (every row) and the sample table (the first rows only).
        n_text = len(prompt_rows) if self.task is not None else min(cfg.sample_rows, len(prompt_rows))
        texts, truncated = decode_responses(self.tokenizer, exp.sequences[:n_text, exp.prompt_len:].cpu(),
                                            mask[:n_text].cpu())
        if self.task is not None:
            golds = self.task.gold_rewards([self.prompts.texts[i] for i in prompt_rows], texts, truncated,
                                           [self.prompts.fields[i] for i in prompt_rows])
            m["objective/gold_reward"] = sum(golds) / len(golds)
        samples = [{"prompt": self.prompts.texts[i], "response": t, "score": s}
                   for i, t, s in zip(prompt_rows[:cfg.sample_rows], texts, exp.scores.tolist())]
        return m, samples

    # -- the update -------------------------------------------------------------------------------
    def update(self, exp: Experience, ctx: StepContext) -> dict[str, float]:
        """The policy and value updates of one iteration; returns their metrics."""
        cfg = self.cfg
        update_value = self.value_model is not None and (ctx.step - 1) % cfg.train.value_update_every == 0
        update_policy = ctx.step > cfg.train.critic_warmup_updates
        # The policy's update kind, as its loss declares it; other kinds step the value model first.
        by_gradient = self.policy_loss.update == "gradient"
        out, minibatches = {}, None
        if self.replay is not None:
            exp, minibatches, out = self.replay_minibatches(exp, ctx.step, proximal=by_gradient)
        if update_value or (update_policy and by_gradient):
            out.update(self.gradient_update(exp, ctx, update_policy and by_gradient, update_value, minibatches))
        if update_policy and not by_gradient:
            kinds = {"trust_region": self.trust_region_update, "soft_actor_critic": self.soft_actor_critic_update}
            out.update(kinds[self.policy_loss.update](exp, ctx, minibatches))
        return out

    def vocab_logprobs(self, model, exp: Experience, idx: torch.Tensor, tokens: torch.Tensor,
                       truncate: bool = True) -> torch.Tensor:
        """(N, V) log-softmax over the vocabulary of `model` at the sampling temperature (after the
        sampler's top-k / top-p cut when `truncate`) at the response tokens `tokens` (len(idx), R
        bool) of rows idx, row-major: the full distributions that TRPO's KL and SAC's soft value need."""
        cfg = self.cfg
        seq, mask = exp.sequences[idx], exp.attention_mask[idx]
        with common.autocast(self.device, self.dtype):
            logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        logits = logits[:, exp.prompt_len - 1:-1].float()[tokens] / cfg.rollout.temperature
        if truncate:
            targets = seq[:, exp.prompt_len:][tokens]
            logits = truncate_logits(logits, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p, keep=targets)
        return logits.log_softmax(-1)

    def soft_actor_critic_update(self, exp: Experience, ctx: StepContext, minibatches: list[torch.Tensor]
                                 ) -> dict[str, float]:
        """SAC on the replayed minibatches (stages/sac_update.py's `sac_update`, algo/sac.py): per
        minibatch, this rank's rows step the twin soft Q critics towards r + V_target(s'), then the
        actor towards pi_ref exp(Q / beta) / Z, then the targets by Polyak averaging; beta is the KL
        controller's. Metrics are averaged over the minibatches."""
        cfg, q = self.cfg, self.q_critics
        knobs = cfg.loss.sac
        params = SACParams(gamma=cfg.loss.gamma, tau=knobs.tau)
        log_beta = torch.tensor(float(self.kl_ctl.value), device=self.device).log()

        def policy(i):
            return self.vocab_logprobs(self.policy_ddp, exp, i, exp.response_mask[i])

        @torch.no_grad()
        def reference(i):
            with self.reference.context():
                return self.vocab_logprobs(self.reference.network, exp, i, exp.response_mask[i], truncate=False)

        def step(opt, loss):
            if opt is self.policy_opt:
                return ctx.clip_and_step(self.policy_params, opt, self.policy_sched, cfg.optim.max_grad_norm, loss)[1]
            return ctx.clip_and_step(q.params, opt, q.scheduler, cfg.optim.max_grad_norm, loss)[1]

        rows: list[dict[str, float]] = []
        for mb in minibatches:
            mine = mb[dist.rank()::dist.world_size()].to(exp.sequences.device)
            rows.append(sac_update(exp, mine, policy_logsoftmax=policy, ref_logsoftmax=reference, critics=q.wrapped,
                                   target_critics=q.targets, critic_optimizer=q.optimizer,
                                   actor_optimizer=self.policy_opt, log_beta=log_beta, params=params, step=step))
        out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}
        out["train/optimizer_steps"] = len(rows)
        return out

    def policy_objective(self, logprobs: torch.Tensor, exp: Experience, idx: torch.Tensor) -> PolicyTerms:
        """The per-token policy objective of rows `idx` at `logprobs` (len(idx), R): the registered
        loss around the proximal policy (`exp.logprobs`), plus beta * KL_t to the reference when
        algo.kl_in=loss, times the IS weight loss.is_correction of pi_prox / pi_behaviour
        (`exp.behaviour_logprobs`; exactly 1 on fresh rows). Every update kind minimises this one function."""
        cfg = self.cfg
        loss_mask = exp.loss_mask[idx]
        out = self.policy_loss.fn(logprobs, exp.logprobs[idx], exp.advantages[idx], loss_mask, self.loss_params)
        losses, kl = out.losses, None
        if cfg.algo.kl_in == "loss":
            kl = torch.where(loss_mask, kl_penalty(logprobs, exp.ref_logprobs[idx], cfg.reward.kl_estimator), 0.0)
            losses = losses + self.kl_ctl.value * kl
        losses, is_out = is_corrected(losses, exp.logprobs[idx], exp.behaviour_logprobs[idx], loss_mask,
                                      cfg.loss.is_correction, cfg.loss.is_cap)
        return PolicyTerms(losses, out, kl, is_out)

    def replay_minibatches(self, exp: Experience, step: int, proximal: bool = True
                           ) -> tuple[Experience, list[torch.Tensor], dict]:
        """Add the rollout to the replay buffer (policy version = iteration `step`), drop stale rows,
        and draw this iteration's minibatches: replay_ratio * num_minibatches of them (a fractional
        count alternates, `replay_plan`), each as many whole groups as an on-policy minibatch,
        uniformly from the buffer. Returns the buffer's rows with `logprobs` set to pi_prox -- the
        policy now, before this update; fresh rows keep theirs, so their IS weight is exactly 1 --
        the minibatches (row indices into it) and the buffer's metrics. `proximal=False` (an update
        that needs no IS correction, SAC) skips the recomputation."""
        cfg, n = self.cfg, self.cfg.algo.samples_per_prompt
        self.replay.add(exp, version=step)
        self.replay.evict_stale(step)
        plan = replay_plan(step - 1, cfg.train.num_minibatches, cfg.algo.replay_ratio, 1)
        pool = self.replay.sample(self.replay.num_groups, self.replay_gen)
        rows, groups = pool.rows, self.replay.num_groups
        per_mb = max(1, exp.sequences.size(0) // n // cfg.train.num_minibatches)
        offsets = torch.arange(n)
        minibatches = [(torch.randperm(groups, generator=self.replay_gen)[:per_mb].sort().values[:, None] * n
                        + offsets).reshape(-1) for _ in range(plan.updates)]
        stale = torch.zeros(rows.sequences.size(0), dtype=torch.bool)
        if minibatches:
            stale[torch.cat(minibatches).unique()] = True
        stale &= (pool.versions != step) & proximal
        prox = rows.behaviour_logprobs.clone()
        if bool(stale.any()):
            idx = stale.nonzero().squeeze(1).to(rows.sequences.device)
            with torch.no_grad(), common.autocast(self.device, self.dtype), dist.full_params(self.policy):
                for part in idx.tensor_split(max(1, math.ceil(idx.numel() / exp.sequences.size(0)))):
                    lp, _ = response_logprobs(self.policy, rows.sequences[part], rows.attention_mask[part],
                                              rows.prompt_len, temperature=cfg.rollout.temperature,
                                              top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p)
                    prox[part] = lp.float()
        versions = pool.versions.float()
        metrics = {"replay/rows": float(rows.sequences.size(0)), "replay/steps": float(plan.updates),
                   "replay/mean_age": float((step - versions).mean()), "replay/stale_rows_used": float(stale.sum())}
        return rows._replace(logprobs=prox), minibatches, metrics

    def gradient_update(self, exp: Experience, ctx: StepContext, update_policy: bool, update_value: bool,
                        minibatches: list[torch.Tensor] | None = None) -> dict[str, float]:
        """ppo_epochs x num_minibatches optimizer steps over shuffled whole groups, or one step per
        given minibatch (row indices of `exp`, as replay draws them); early stop on train.target_kl."""
        cfg = self.cfg
        n = cfg.algo.samples_per_prompt
        steps: list[StepStats] = []
        early_stop = False
        epochs = [minibatches] if minibatches is not None else (
            minibatch_indices(exp.sequences.size(0) // n, n, cfg.train.num_minibatches, self.shuffle_gen)
            for _ in range(cfg.train.ppo_epochs))
        for epoch in epochs:
            for mb in epoch:
                stats = self.optimizer_step(exp, mb.to(exp.sequences.device), ctx, update_policy, update_value)
                steps.append(stats)
                if (cfg.train.target_kl is not None and update_policy
                        and float(stats.losses.approx_kl) > cfg.train.target_kl):
                    early_stop = True
                    break
            if early_stop:
                break
        out = update_metrics(steps, update_policy, update_value)
        out.update({"train/optimizer_steps": len(steps), "train/early_stopped": float(early_stop)})
        return out

    def optimizer_step(self, exp: Experience, mb: torch.Tensor, ctx: StepContext, update_policy: bool,
                       update_value: bool) -> StepStats:
        """One optimizer step on minibatch `mb` (global row indices, the same on every rank)."""
        cfg = self.cfg
        total = self.accumulate_gradients(exp, mb, update_policy, update_value)
        if cfg.loss.ptx_coef > 0 and update_policy and self.ptx_ids:
            lm = self.ptx_step()
            total = total._replace(ptx=total.ptx + lm, loss=total.loss + cfg.loss.ptx_coef * lm)
        total = total.all_reduce()
        policy_gn = value_gn = 0.0
        if update_policy:
            _, policy_gn = ctx.clip_and_step(self.policy_params, self.policy_opt, self.policy_sched,
                                             cfg.optim.max_grad_norm, total.loss)
        if update_value:
            _, value_gn = ctx.clip_and_step(self.value_params, self.value_opt, self.value_sched,
                                            cfg.optim.max_grad_norm, total.loss)
        if not update_policy:  # critic warm-up: drop what the value loss left on a shared trunk
            self.policy_opt.zero_grad(set_to_none=True)
        return StepStats(total, policy_gn, value_gn)

    def accumulate_gradients(self, exp: Experience, mb: torch.Tensor, update_policy: bool,
                             update_value: bool) -> LossStats:
        """Backpropagate this rank's share of minibatch `mb`'s loss; returns its (unreduced) stats.

        The per-token weights of the loss (its aggregation) are computed on the whole minibatch;
        each rank takes its rows, split into grad_accum micro-batches, and backpropagates their
        weighted sums -- so the gradient is the minibatch's however it is split.
        """
        cfg = self.cfg
        world = dist.world_size()
        policy_w = AGGREGATIONS[cfg.algo.aggregation](exp.loss_mask[mb], self.max_new_tokens)
        token_w = token_mean_weights(exp.loss_mask[mb], self.max_new_tokens)
        value_w = token_mean_weights(exp.response_mask[mb], self.max_new_tokens)
        total = LossStats.zeros()
        mine = torch.arange(mb.numel(), device=mb.device)[dist.rank()::world]
        for micro in mine.tensor_split(cfg.train.grad_accum):
            if not micro.numel():
                continue
            with common.autocast(self.device, self.dtype):
                loss, stats = self.micro_step(exp, mb[micro], policy_w[micro], token_w[micro], value_w[micro],
                                              update_policy, update_value)
            (loss * world).backward()  # DDP averages gradients over ranks, hence the world-size factor
            total = total + stats
        return total

    def micro_step(self, exp: Experience, idx: torch.Tensor, policy_w: torch.Tensor, token_w: torch.Tensor,
                   value_w: torch.Tensor, update_policy: bool, update_value: bool) -> tuple[torch.Tensor, LossStats]:
        """The weighted loss of rows `idx` (L_policy + beta*KL if in the loss - c_H*H + c1*L_VF) and its stats."""
        cfg = self.cfg
        seq, mask, P = exp.sequences[idx], exp.attention_mask[idx], exp.prompt_len
        loss_mask = exp.loss_mask[idx]
        z = torch.zeros((), device=seq.device)
        total, policy, kl_term, ent, vf = z, z, z, z, z
        clipfrac, approx_kl, ratio_mean, vclip, is_weight, is_clipped = z, z, z, z, z, z
        ratio_max = is_max = torch.tensor(float("-inf"))
        if update_policy:
            logprobs, entropy = response_logprobs(self.policy_ddp, seq, mask, P, temperature=cfg.rollout.temperature,
                                                  top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                                                  with_entropy=cfg.loss.entropy_coef > 0)
            terms = self.policy_objective(logprobs, exp, idx)
            out, kl = terms.loss_out, terms.kl
            if kl is not None:
                kl_term = (policy_w * terms.is_weights.weights * kl).sum()
            policy = (policy_w * terms.is_weights.weights * out.losses).sum()
            total = (policy_w * terms.losses).sum()
            if cfg.loss.entropy_coef > 0:
                ent = (token_w * entropy).sum()
                total = total - cfg.loss.entropy_coef * ent
            with torch.no_grad():
                log_ratio = torch.where(loss_mask, logprobs - exp.logprobs[idx], 0.0)
                clipfrac = (token_w * out.clipped.float()).sum()
                approx_kl = (token_w * (torch.expm1(log_ratio) - log_ratio)).sum()
                ratio_mean = (token_w * out.ratio).sum()
                ratio_max = torch.where(loss_mask, out.ratio, float("-inf")).max() if loss_mask.any() else ratio_max
                share = token_w.sum()  # this micro-batch's share of the minibatch's tokens
                is_weight, is_clipped = terms.is_weights.stats.mean * share, terms.is_weights.stats.clipped_frac * share
                is_max = terms.is_weights.stats.max if loss_mask.any() else is_max
        if update_value:
            values = response_values(self.value_ddp, seq, mask, P).float()
            vf, vclip = value_loss(values, exp.values[idx], exp.returns[idx], exp.response_mask[idx],
                                   cfg.loss.value_clip_eps, weights=value_w)
            total = total + cfg.loss.vf_coef * vf
        stats = LossStats(total.detach(), policy.detach(), kl_term.detach(), ent.detach(), vf.detach(), z,
                          clipfrac, approx_kl, ratio_mean, torch.as_tensor(vclip), is_weight, is_clipped,
                          ratio_max.detach(), torch.as_tensor(is_max))
        return total, stats

    def ptx_step(self) -> torch.Tensor:
        """PPO-ptx: backpropagate c2 * L_LM on a pretraining batch (this rank's share); returns L_LM.

        The batch is drawn from (seed, optimizer steps so far): a new batch for every optimizer step,
        and the same one after a resume (the scheduler's count is checkpointed).
        """
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.run.seed * 7919 + self.policy_sched.last_epoch * 131)
        rows = torch.randint(len(self.ptx_ids), (cfg.loss.ptx_batch_size,), generator=g).tolist()
        mine = dist.shard(rows)
        tokens = lambda rs: sum(len(self.ptx_ids[i]) - 1 for i in rs)  # noqa: E731
        share = tokens(mine) / max(1, tokens(rows))
        ids, mask = pad_right([self.ptx_ids[i] for i in mine], self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with common.autocast(self.device, self.dtype):
            logits = self.policy_ddp(input_ids=ids, attention_mask=mask,
                                     position_ids=position_ids_from_mask(mask)).logits
        lm = lm_loss(logits[:, :-1].float(), ids[:, 1:], mask[:, 1:])
        (cfg.loss.ptx_coef * lm * share * dist.world_size()).backward()
        return lm.detach().double() * share

    # -- the trust-region update -----------------------------------------------------------------
    def trust_region_update(self, exp: Experience, ctx: StepContext, minibatches: None = None) -> dict[str, float]:
        """One trust-region step of the policy on the whole rollout (algo/trpo.py's
        `trust_region_step`) on the policy objective: CG on Fisher-vector products of the mean
        per-token KL(pi_old || pi_theta), the step scaled to algo.trpo.max_kl, a backtracking line
        search. This supplies the closures: the objective and the KL over the vocabulary at the
        loss tokens, per micro-batch of this rank's rows. Logs the accepted fraction and the KL."""
        cfg, tr = self.cfg, self.cfg.algo.trpo
        all_rows = torch.arange(exp.sequences.size(0), device=exp.sequences.device)
        policy_w = AGGREGATIONS[cfg.algo.aggregation](exp.loss_mask, self.max_new_tokens)
        token_w = token_mean_weights(exp.loss_mask, self.max_new_tokens)

        def shares(rows):  # this rank's rows of `rows`, in grad_accum micro-batches
            return [m for m in rows[dist.rank()::dist.world_size()].tensor_split(cfg.train.grad_accum) if m.numel()]

        def log_softmax(idx):  # (N, V) log pi_theta at the loss tokens (no DDP: TRPO reduces by hand)
            return self.vocab_logprobs(self.policy, exp, idx, exp.loss_mask[idx])

        def kl_old_new(idx, old_lp, lp_all, weights):
            # KL(old || new) per loss token; tokens outside a top-k/top-p cut have probability 0
            kl_tok = torch.where(old_lp > float("-inf"), old_lp.exp() * (old_lp - lp_all), 0.0).sum(-1)
            return (weights[idx][exp.loss_mask[idx]] * kl_tok).sum()

        def surrogate_and_kl(batch):
            idx, old_lp = batch
            lp_all = log_softmax(idx)
            targets = exp.sequences[idx][:, exp.prompt_len:][exp.loss_mask[idx]]
            taken = lp_all.gather(-1, targets[:, None]).squeeze(-1)
            lp = torch.zeros_like(exp.logprobs[idx]).masked_scatter(exp.loss_mask[idx], taken)
            terms = self.policy_objective(lp, exp, idx)
            return (policy_w[idx] * terms.losses).sum(), kl_old_new(idx, old_lp, lp_all, token_w)

        # The Fisher matrix is estimated on every k-th row (TRPO's usual subsampling: CG's cost).
        fisher_rows = all_rows[::max(1, round(1 / tr.fisher_fraction))]
        fisher_w = torch.zeros_like(token_w)
        fisher_w[fisher_rows] = token_mean_weights(exp.loss_mask[fisher_rows], self.max_new_tokens)
        with torch.no_grad():
            batches = [(idx, log_softmax(idx)) for idx in shares(all_rows)]
            fisher = [(idx, log_softmax(idx)) for idx in shares(fisher_rows)]

        def double_backward():  # the fused attention and oneDNN kernels have no double backward
            stack = contextlib.ExitStack()
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            stack.enter_context(onednn.disabled())
            return stack

        res = trust_region_step(
            self.policy_params, batches, surrogate_and_kl, fisher,
            lambda b: kl_old_new(b[0], b[1], log_softmax(b[0]), fisher_w),
            tr.max_kl, tr.cg_iters, tr.damping, tr.backtrack, tr.line_search_steps,
            all_reduce=dist.all_reduce_sum, double_backward=double_backward)
        return {"trpo/step_fraction": res.search.fraction, "trpo/kl": res.search.kl,
                "trpo/line_search_tries": res.search.tries, "trpo/step_size": res.step_size,
                "trpo/surrogate_improvement": res.old_surrogate - res.search.surrogate,
                "loss/policy": res.search.surrogate}

    # -- critic ------------------------------------------------------------------------------------
    @torch.no_grad()
    def explained_variance_after(self, exp: Experience) -> float:
        """Explained variance of the returns by the value model after this update."""
        values = []
        for idx in torch.arange(exp.sequences.size(0)).tensor_split(max(1, self.cfg.train.num_minibatches)):
            with common.autocast(self.device, self.dtype):
                values.append(response_values(self.value_model, exp.sequences[idx], exp.attention_mask[idx],
                                              exp.prompt_len).float())
        return explained_variance(torch.cat(values), exp.returns, exp.response_mask)

    def pretrain_critic(self) -> dict[str, float]:
        """Critic-only pretraining: fit the value model on train.critic_pretrain_rollouts fixed
        rollouts of the initial policy, critic_pretrain_epochs passes, before any policy update."""
        cfg = self.cfg
        exps = []
        for r in range(cfg.train.critic_pretrain_rollouts):
            g = torch.Generator().manual_seed(cfg.run.seed * 31 + r)
            rows = torch.randperm(len(self.prompts.ids), generator=g)[:cfg.rollout.batch_size].tolist()
            exps.append(make_experience(self.rollout(rows, 0, r), cfg, self.kl_ctl.value, self.max_new_tokens,
                                        self.running))
        ctx = StepContext(0, NonFiniteGuard(cfg.run.max_nonfinite), None)
        before = sum(explained_variance(e.values, e.returns, e.response_mask) for e in exps) / len(exps)
        for _ in range(cfg.train.critic_pretrain_epochs):
            for e in exps:
                self.gradient_update(e, ctx, update_policy=False, update_value=True)
        after = sum(self.explained_variance_after(e) for e in exps) / len(exps)
        return {"critic_pretrain/explained_variance_before": before, "critic_pretrain/explained_variance_after": after}


def normalizes_scores(cfg: PPOConfig) -> bool:
    """`reward.normalize`, where null (auto) means: on when reward functions are the whole reward."""
    return cfg.reward.normalize if cfg.reward.normalize is not None else not cfg.reward_model


def run_rl(cfg: PPOConfig, resume: bool = False, reward_functions: Sequence[Callable] | None = None) -> dict:
    """Train the policy with the configured RL algorithm; returns the stage summary.

    `reward_functions`: Python callables used as reward functions in addition to reward.functions
    (the Python API's way to pass them).
    """
    out_dir = Path(common.require(cfg.out_dir, "out_dir", "where to write the RL policy"))
    device = common.setup(cfg.run, cfg.algo.name, model=cfg.policy, work=RLTrainer.work)
    t_start = time.time()
    trainer = RLTrainer(cfg, device, reward_functions)
    loop = StageLoop(trainer, out_dir, cfg.run)
    if (done := loop.begin(resume)) is not None:
        return done
    if loop.step == 0:
        notes = list(trainer.truncation)
        if cfg.reward.normalize is None and trainer.running is not None:
            notes.append("reward.normalize (auto): on, the reward functions are the whole reward; their "
                         "scores are standardised by a running mean/std (reward.normalize=false to keep them as given)")
        for line in notes:
            if dist.is_main():
                print(f"[{trainer.name}] {line}")
        if trainer.value_model is not None and cfg.train.critic_pretrain_rollouts:
            loop.log(StepResult(trainer.pretrain_critic()))
        if cfg.run.eval_every:
            loop.evaluate()
    if not loop.run():
        return {"stopped_at": loop.step}
    final = loop.evaluate()
    summary = {"stage": "rl", "algo": cfg.algo.name, "updates": cfg.train.updates,
               "final_beta": trainer.kl_ctl.value, "skipped_steps": loop.guard.skipped_total,
               **{k.split("/", 1)[1]: v for k, v in final.items()}}
    # on every rank: FSDP gathers the shards to rank 0
    policy = dist.plain_copy(trainer.policy)
    value_model = dist.plain_copy(trainer.value_model) if trainer.value_model is not None else None
    if dist.is_main():
        save_model(policy, trainer.tokenizer, out_dir / "model")
        if value_model is not None:
            save_model(value_model, trainer.tokenizer, out_dir / "value_model")
        summary.update(seconds=time.time() - t_start, config=to_dict(cfg))
        write_summary(out_dir, summary)
    loop.close()
    return summary


run_ppo = run_rl  # `ppo-rlhf ppo` is the RL stage with its default algorithm
