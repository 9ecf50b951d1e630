"""Direct preference optimisation beside RL: train the SFT policy on preference pairs with a
registered loss of `algo.preference` (DPO, IPO, SimPO, KTO, ORPO), offline or online.

    ppo-rlhf dpo policy=run/sft/model train_file=data/prefs_train.jsonl eval_file=data/prefs_eval.jsonl \
        eval_prompts_file=data/prompts_eval.jsonl task=arithmetic out_dir=run/dpo loss=dpo
    ppo-rlhf dpo ... online.enabled=true reward_model=run/reward/model prompts_file=data/prompts_train.jsonl

Offline, a step is one optimizer step on a global batch of the fixed pairs (read as the reward
stage reads them: pairs or rankings). Online (iterative DPO), a step is one round:
1. sample two responses to each of `online.prompts_per_round` prompts from the current policy
   (`rollout.sample`, at `online.temperature`);
2. label them with the reward model and/or reward functions (`rollout.Scorer`; a response without
   EOS scores `online.missing_eos_penalty`): the better-scored one is chosen, ties are skipped
   and counted;
3. `online.epochs` passes over the new pairs, `batch_size` pairs per optimizer step.

Every optimizer step goes through `train_step`: the loss of each pair (`PREFERENCE_LOSSES[loss]`)
averaged over the global batch, however it is split into micro-batches and ranks. What a loss
needs is provided by one path each: the reference's log-probs (`needs_reference`: a frozen copy of
the SFT model, or with LoRA the base model with the adapters disabled; computed once for the
fixed pairs with `precompute_ref`, once per round online) and the mismatched log-probs
(`needs_mismatched`: each prompt of the batch with the next pair's responses, KTO's KL reference
point, on the whole global batch and without gradient). Log-probs are at temperature 1 and the
dropout of the policy is off, as in the RL stage.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..algo.preference import PREFERENCE_LOSSES, PreferenceBatch, PreferenceParams
from ..config import RL_LR, DPOConfig, OnlineDPOConfig, PPOConfig, to_dict
from ..data.collate import PaddedSet, collate_pairs, pad_left, pad_right, pair_rows, position_ids_from_mask
from ..data.encode import EncodedPair, check_token_ids, encode_pairs, encode_prompts
from ..data.jsonl import prompt_text, read_preferences, read_prompts
from ..errors import UserError
from ..metrics import write_summary
from ..models import apply_lora, check_same_tokenizer, disable_dropout, load_causal_lm, load_scalar_model, save_model
from ..rewards import RewardFunctions
from ..rollout import Reference, Scorer, gather_groups, sample
from ..tasks import get_task
from ..tokenizer import load_tokenizer
from . import common
from .evaluate import decode_responses, evaluate_policy, load_eval_prompts
from .loop import StageLoop, StepResult


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) sum of log pi(token) over the loss-mask tokens of each row, and (B,) their count.

    batch: input_ids, attention_mask, loss_mask (B, T), any padding side; loss_mask is True on
    the response tokens (EOS included). Position t's logits predict token t + 1; float32 log-softmax.
    """
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False).logits[:, :-1].float()
    targets, weights = ids[:, 1:], loss_mask[:, 1:]
    token_lp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    # where, not a product: a padded position's logits are never read into the sum
    return torch.where(weights, token_lp, 0.0).sum(1), weights.sum(1)


def padded_preference_pairs(pairs: list[EncodedPair], pad_id: int) -> PaddedSet:
    """`padded_pairs` plus the loss mask: 2N right-padded rows (chosen rows, then rejected ones)
    with input_ids, attention_mask and loss_mask (True on each response's tokens)."""
    tensors = collate_pairs(pairs, pad_id)
    prompt_len = torch.tensor([p.prompt_len for p in pairs] * 2)
    positions = torch.arange(tensors["input_ids"].size(1))
    tensors["loss_mask"] = (positions[None] >= prompt_len[:, None]) & tensors["attention_mask"]
    return PaddedSet(tensors)


class PairData(NamedTuple):
    """Training pairs: the encoded pairs, their padded rows, and the reference's log-probs of
    each row (2N,) when precomputed (else None)."""

    pairs: list[EncodedPair]
    rows: PaddedSet
    ref_logps: torch.Tensor | None

    @property
    def n(self) -> int:
        return len(self.pairs)


def mismatched_batch(pairs: list[EncodedPair], idx: list[int], max_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """KTO's mismatched rows for the pairs `idx`: the prompt of pair idx[k] with the chosen and
    the rejected response of pair idx[k+1] (cyclically), cut to max_len tokens. 2 len(idx) rows."""
    seqs, starts = [], []
    for k, i in enumerate(idx):
        j = idx[(k + 1) % len(idx)]
        prompt = pairs[i].chosen_ids[:pairs[i].prompt_len]
        for response in (pairs[j].chosen_ids, pairs[j].rejected_ids):
            seqs.append((prompt + response[pairs[j].prompt_len:])[:max_len])
            starts.append(len(prompt))
    ids, mask = pad_right(seqs, pad_id)
    loss_mask = (torch.arange(ids.size(1))[None] >= torch.tensor(starts)[:, None]) & mask
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


ONLINE_BETA = 0.5
"""beta of online DPO when `beta` is not given (arithmetic, seed 0: 0.1 over-optimised the RM, gold
0.645 -> 0.568; 0.5 at T = 0.7 gave 0.760 at KL 0.83; benchmarks/PREFERENCE.md)."""


class DPOStage(common.Training):
    """Preference optimisation for the stage loop (loop.py): a step is one optimizer step on the
    fixed pairs, or one sample-label-train round online."""

    name = command = "dpo"

    def __init__(self, cfg: DPOConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.entry = PREFERENCE_LOSSES[cfg.loss]
        default_beta = ONLINE_BETA if cfg.online.enabled else self.entry.default_beta
        self.loss_params = PreferenceParams(beta=cfg.beta if cfg.beta is not None else default_beta,
                                            label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
                                       desirable_weight=cfg.desirable_weight,
                                       undesirable_weight=cfg.undesirable_weight)
        self.online = cfg.online.enabled
        self.unit = "round" if self.online else "step"
        self.dtype = common.compute_dtype(cfg.run, device, cfg.policy)
        tok = self.tokenizer = load_tokenizer(cfg.policy)
        self.task = get_task(cfg.task) if cfg.task else None
        default_tokens = self.task.default_max_new_tokens if self.task else 32
        self.eval_max_new_tokens = default_tokens

        # -- models: the policy, the reference (frozen copy or LoRA base), the reward model -------
        policy = disable_dropout(load_causal_lm(cfg.policy, tok).to(device))
        if cfg.model.lora_r:
            policy = apply_lora(policy, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout)
            self.reference = Reference(lora_policy=policy)
        else:
            frozen = load_causal_lm(cfg.policy, tok).to(device).requires_grad_(False).eval()
            self.reference = Reference(model=disable_dropout(frozen))
        self.reward_model = None
        if cfg.reward_model:
            check_same_tokenizer(cfg.policy, "policy", cfg.reward_model, "reward_model")
            self.reward_model = load_scalar_model(cfg.reward_model, tok).to(device).requires_grad_(False).eval()

        # -- data -------------------------------------------------------------------------------
        self.truncation: list[str] = []
        self.data: PairData | None = None
        if self.online:
            total = cfg.online.rounds
            examples, _ = read_prompts(cfg.prompts_file)
            self.prompt_ids, trunc = encode_prompts(tok, examples, cfg.max_prompt_len)
            check_token_ids(self.prompt_ids, policy.config.vocab_size, cfg.prompts_file)
            self.prompt_texts = [prompt_text(e) for e in examples]
            self.prompt_fields = [e.fields for e in examples]
            if trunc.prompts_truncated or trunc.dropped:
                self.truncation.append(f"{cfg.prompts_file}: {trunc.describe()}")
            self.max_new_tokens = cfg.online.max_new_tokens or default_tokens
            self.rollout_cfg = rollout_config(cfg.online)
            specs = [s.strip() for s in cfg.online.functions.split(",") if s.strip()]
            weights = [float(w) for w in cfg.online.weights.split(",") if w.strip()] or None
            self.scorer = Scorer(self.rollout_cfg, tok, self.reward_model,
                                 RewardFunctions(specs, weights) if specs else None)
            per_round = math.ceil(cfg.online.prompts_per_round / cfg.batch_size) * cfg.online.epochs
            optimizer_steps = total * per_round  # at most: tied pairs are skipped
        else:
            raw, _ = read_preferences(cfg.train_file)
            pairs, trunc = encode_pairs(tok, raw, cfg.max_prompt_len, cfg.max_len)
            check_token_ids(pairs, policy.config.vocab_size, cfg.train_file)
            if trunc.prompts_truncated or trunc.responses_truncated or trunc.dropped:
                self.truncation.append(f"{cfg.train_file}: {trunc.describe()}")
            if not pairs:
                raise UserError(f"train_file: {cfg.train_file} has no usable preference pair ({trunc.describe()})")
            total = common.total_steps(len(pairs), cfg.batch_size, cfg.epochs, cfg.max_steps)
            optimizer_steps = total
        self.eval_data: PairData | None = None
        if cfg.eval_file:
            raw, _ = read_preferences(cfg.eval_file)
            eval_pairs, _ = encode_pairs(tok, raw, cfg.max_prompt_len, cfg.max_len)
            check_token_ids(eval_pairs, policy.config.vocab_size, cfg.eval_file)
            if eval_pairs:
                rows = padded_preference_pairs(eval_pairs, tok.pad_token_id)
                # No precomputed reference here: evaluation runs the reference on the policy's own
                # batches, so equal weights give equal log-probs bit for bit (BLAS rounding depends
                # on the batch shape: with precomputed values the step-0 margins were +-1e-6 noise,
                # and "accuracy" the sign of that noise, e.g. 0.15 on 2 ranks against 0.0 on one).
                self.eval_data = PairData(eval_pairs, rows, None)
        self.eval_prompts = None
        if cfg.eval_prompts_file:
            self.eval_prompts = load_eval_prompts(cfg.eval_prompts_file, tok, cfg.max_prompt_len, cfg.eval_samples)

        optim = cfg.optim
        if self.online:
            optim = dataclasses.replace(optim, lr=cfg.online.lr if cfg.online.lr is not None else RL_LR)
        super().__init__(policy, optim, cfg.run, device, optimizer_steps)
        self.total_steps = total
        if self.reference.model is not None:
            dist.wrap_model(self.reference.model, device, cfg.run)
        if not self.online:
            rows = padded_preference_pairs(pairs, tok.pad_token_id)
            ref = self.reference_logps(rows) if self.entry.needs_reference and cfg.precompute_ref else None
            self.data = PairData(pairs, rows, ref)
            n = len(pairs)
            self.pair_lengths = torch.maximum(rows.lengths[:n], rows.lengths[n:])

    # -- log-probs -------------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(self, rows: PaddedSet, batch_size: int = 64) -> torch.Tensor:
        """(len(rows),) log pi_ref of every row's response, in batches of similar length (the
        same on every rank: each computes all of them)."""
        out = torch.zeros(len(rows), dtype=torch.float32)
        order = rows.lengths.argsort(stable=True).tolist()
        with self.reference.context(), common.autocast(self.device, self.dtype):
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                batch = {k: v.to(self.device) for k, v in rows.batch(idx).items()}
                out[idx] = sequence_logprobs(self.reference.network, batch)[0].cpu()
        return out

    @torch.no_grad()
    def mismatched_logps(self, data: PairData, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-probs of the global batch's mismatched rows (no gradient)."""
        batch = mismatched_batch(data.pairs, idx, self.cfg.max_len, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with common.autocast(self.device, self.dtype):
            policy, _ = sequence_logprobs(self.model, batch)
            with self.reference.context():
                ref, _ = sequence_logprobs(self.reference.network, batch)
        return policy, ref

    def pair_batch(self, model, data: PairData, pairs: list[int], mismatched=None) -> PreferenceBatch:
        """The `PreferenceBatch` of pairs `pairs`: one forward of `model` over their chosen and
        rejected rows, and what the loss needs besides."""
        rows = pair_rows(pairs, data.n)
        batch = {k: v.to(self.device) for k, v in data.rows.batch(rows).items()}
        with common.autocast(self.device, self.dtype):
            logps, lengths = sequence_logprobs(model, batch)
        m = len(pairs)
        ref_c = ref_r = None
        if self.entry.needs_reference:
            if data.ref_logps is not None:
                ref = data.ref_logps[rows].to(self.device)
            else:
                with torch.no_grad(), self.reference.context(), common.autocast(self.device, self.dtype):
                    ref, _ = sequence_logprobs(self.reference.network, batch)
            ref_c, ref_r = ref[:m], ref[m:]
        mism, ref_mism = mismatched if mismatched is not None else (None, None)
        return PreferenceBatch(logps[:m], logps[m:], lengths[:m].float(), lengths[m:].float(), ref_c, ref_r,
                               mism, ref_mism)

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self, ctx, data: PairData, global_idx: list[int]) -> torch.Tensor:
        """One optimizer step on the pairs `global_idx`: the mean of their losses, this rank's
        share in grad_accum micro-batches. Returns the global sums (loss, chosen reward, rejected
        reward, accuracy, pairs) as a (5,) float64 tensor."""
        self.model.train()
        mismatched = self.mismatched_logps(data, global_idx) if self.entry.needs_mismatched else None
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        for micro in common.micro_batches(dist.shard(global_idx), self.cfg.grad_accum):
            out = self.entry.fn(self.pair_batch(self.ddp_model, data, micro, mismatched), self.loss_params)
            # mean over the global batch; DDP averages gradients over ranks, hence the world size
            (out.losses.sum() * dist.world_size() / len(global_idx)).backward()
            sums += pair_sums(out)
        sums = dist.all_reduce_sum(sums)
        self.optimizer_step(ctx, sums[0].float() / len(global_idx))
        return sums

    def step(self, ctx) -> StepResult:
        t0 = time.time()
        if self.online:
            return self.online_round(ctx, t0)
        cfg = self.cfg
        idx = common.bucketed_batch(self.pair_lengths, cfg.batch_size, cfg.run.seed, ctx.step - 1, cfg.bucket_batches)
        sums = self.train_step(ctx, self.data, idx)
        m = pair_metrics(sums, "train")
        m.update({"train/lr": self.sched.get_last_lr()[0], "train/skipped_steps": ctx.guard.skipped_total,
                  "perf/seconds_per_step": time.time() - t0})
        return StepResult(m, progress={"loss": f"{m['train/loss']:.3f}", "acc": f"{m['train/accuracy']:.2f}"})

    # -- online rounds ---------------------------------------------------------------------------
    def online_round(self, ctx, t0: float) -> StepResult:
        """Round `ctx.step`: sample and label pairs, then online.epochs passes over them."""
        cfg, on = self.cfg, self.cfg.online
        rows = common.global_batch(len(self.prompt_ids), on.prompts_per_round, cfg.run.seed, ctx.step - 1)
        pairs, label = self.sample_pairs(rows, ctx.step)
        t_sample = time.time() - t0
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        steps = 0
        if pairs:
            padded = padded_preference_pairs(pairs, self.tokenizer.pad_token_id)
            data = PairData(pairs, padded, self.reference_logps(padded) if self.entry.needs_reference else None)
            for epoch in range(on.epochs):
                g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + ctx.step * 7919 + epoch)
                order = torch.randperm(len(pairs), generator=g)
                for mb in order.tensor_split(math.ceil(len(pairs) / cfg.batch_size)):
                    if self.entry.needs_mismatched and len(mb) < 2:
                        continue  # a mismatched response needs another pair
                    sums += self.train_step(ctx, data, mb.tolist())
                    steps += 1
        m = pair_metrics(sums, "train") if steps else {}
        m.update(label)
        m.update({"online/optimizer_steps": steps, "train/lr": self.sched.get_last_lr()[0],
                  "train/skipped_steps": ctx.guard.skipped_total, "time/sample_and_label": t_sample,
                  "perf/seconds_per_round": time.time() - t0})
        return StepResult(m, progress={"pairs": str(len(pairs)), "score": f"{label['online/score']:.2f}"})

    @torch.no_grad()
    def sample_pairs(self, rows: list[int], round_: int) -> tuple[list[EncodedPair], dict[str, float]]:
        """Two responses to each prompt `rows` from the current policy, labelled: the pairs (in
        prompt order, ties left out) and the labelling's figures. Each rank samples its share of
        the prompts from per-row streams (so the result does not depend on the world size); the
        labelled rows are gathered, so every rank holds every pair."""
        cfg, tok, dev = self.cfg, self.tokenizer, self.device
        self.model.eval()
        mine = dist.shard(range(len(rows)))
        width = max(len(self.prompt_ids[i]) for i in rows)  # one prompt width on all ranks
        prompt_ids, prompt_mask = pad_left([self.prompt_ids[rows[j]] for j in mine], tok.pad_token_id, width)
        prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
        base = (cfg.run.seed * 1_000_003 + round_) * 2**20
        seeds = [base + 2 * j + k for j in mine for k in range(2)]
        with common.autocast(dev, self.dtype), dist.full_params(self.model):
            ro = sample(self.model, prompt_ids, prompt_mask, self.rollout_cfg, self.max_new_tokens,
                        tok.eos_token_id, tok.pad_token_id, seeds)
        length = int(dist.all_reduce_max(torch.tensor(ro.response_ids.size(1))))
        resp = F.pad(ro.response_ids, (0, length - ro.response_ids.size(1)), value=tok.pad_token_id)
        resp_mask = F.pad(ro.response_mask, (0, length - ro.response_mask.size(1)), value=False)
        sequences = torch.cat([ro.prompt_ids, resp], 1)
        attention_mask = torch.cat([ro.prompt_mask, resp_mask], 1)
        prompt_rows = [rows[j] for j in mine for _ in range(2)]
        texts = decode_responses(tok, resp.cpu(), resp_mask.cpu())[0] if self.scorer.names else [""] * len(prompt_rows)
        with common.autocast(dev, self.dtype):
            score, _, _, _ = self.scorer(sequences, attention_mask, resp_mask,
                                         [self.prompt_texts[i] for i in prompt_rows], texts,
                                         [self.prompt_fields[i] for i in prompt_rows], prompt_rows)
        truncated = ~((resp == tok.eos_token_id) & resp_mask).any(1)
        if cfg.online.truncated == "penalty":
            score = torch.where(truncated, torch.full_like(score, cfg.online.missing_eos_penalty), score.float())
        resp, resp_mask, score, truncated = (gather_groups(t, 2) for t in (resp, resp_mask, score.float(), truncated))
        pairs = []
        for j, i in enumerate(rows):
            a, b = 2 * j, 2 * j + 1
            if score[a] == score[b]:
                continue
            win, lose = (a, b) if score[a] > score[b] else (b, a)
            prompt = self.prompt_ids[i]
            chosen = resp[win][resp_mask[win]].tolist()
            rejected = resp[lose][resp_mask[lose]].tolist()
            pairs.append(EncodedPair(prompt + chosen, prompt + rejected, len(prompt), f"round {round_}, prompt {i}"))
        n = len(rows)
        return pairs, {"online/pairs": len(pairs), "online/ties": n - len(pairs),
                       "online/tie_fraction": 1 - len(pairs) / n, "online/score": score.mean().item(),
                       "online/score_margin": (score[0::2] - score[1::2]).abs().mean().item(),
                       "online/truncated": truncated.float().mean().item(),
                       "online/response_length": resp_mask.sum(1).float().mean().item()}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, step: int) -> StepResult:
        """Held-out pairs (implicit rewards, margin, accuracy) and held-out prompts (gold reward,
        RM score and KL to the reference of sampled and greedy responses)."""
        m: dict[str, float] = {}
        samples = []
        if self.eval_data is not None:
            m.update(pair_metrics(self.eval_pairs(), "eval"))
        if self.eval_prompts is not None:
            cfg = self.cfg
            with dist.full_params(self.model, self.reward_model, self.reference.model):
                for kind, temperature in (("", cfg.eval_temperature), ("_greedy", 0.0)):
                    res = evaluate_policy(self.model, self.tokenizer, self.eval_prompts, task=cfg.task,
                                          device=self.device, reward_model=self.reward_model, reference=self.reference,
                                          max_new_tokens=self.eval_max_new_tokens, temperature=temperature,
                                          seed=cfg.run.seed + 99, sample_rows=cfg.sample_rows if not kind else 0)
                    m.update({f"eval/{k}{kind}": v for k, v in res.items()
                              if isinstance(v, float) and k in ("gold_reward", "rm_score", "kl", "response_length")})
                    samples += res["samples"]
        return StepResult(m, samples=samples)

    @torch.no_grad()
    def eval_pairs(self, batch_size: int = 64) -> torch.Tensor:
        """Global sums (loss, chosen reward, rejected reward, accuracy, pairs) on the held-out pairs."""
        self.model.eval()
        data = self.eval_data
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        mine = dist.shard(list(range(data.n)))
        with dist.full_params(self.model):  # ranks may run different numbers of batches
            for i in range(0, len(mine), batch_size):
                idx = mine[i:i + batch_size]
                mism = self.mismatched_logps(data, idx) if self.entry.needs_mismatched and len(idx) > 1 else None
                if self.entry.needs_mismatched and mism is None:
                    continue
                sums += pair_sums(self.entry.fn(self.pair_batch(self.model, data, idx, mism), self.loss_params))
        return dist.all_reduce_sum(sums)


def rollout_config(online: OnlineDPOConfig) -> PPOConfig:
    """The settings `rollout.sample` and `rollout.Scorer` read: two samples per prompt at the
    online temperature; the reward model's score plus the functions' weighted sum."""
    cfg = PPOConfig()
    cfg.algo.samples_per_prompt = 2
    cfg.rollout.temperature = online.temperature
    cfg.rollout.max_new_tokens = online.max_new_tokens
    return cfg


def pair_sums(out) -> torch.Tensor:
    """(5,) float64: sums of loss, chosen reward, rejected reward, accuracy, and the pair count."""
    acc = (out.chosen_rewards > out.rejected_rewards).double()
    return torch.stack([out.losses.detach().double().sum(), out.chosen_rewards.double().sum(),
                        out.rejected_rewards.double().sum(), acc.sum(),
                        torch.tensor(float(acc.numel()), dtype=torch.float64, device=acc.device)])


def pair_metrics(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """Means of `pair_sums` as `{prefix}/loss, chosen_reward, rejected_reward, margin, accuracy`
    (accuracy: the chosen response's implicit reward is the higher; ties count as wrong)."""
    loss, chosen, rejected, acc, n = (sums / sums[4].clamp(min=1)).tolist()
    return {f"{prefix}/loss": loss, f"{prefix}/chosen_reward": chosen, f"{prefix}/rejected_reward": rejected,
            f"{prefix}/margin": chosen - rejected, f"{prefix}/accuracy": acc}


def check_config(cfg: DPOConfig) -> None:
    """Refuse settings this run would not read, and missing inputs, naming the key."""
    entry = PREFERENCE_LOSSES[cfg.loss]
    defaults = DPOConfig()
    for knob in ("label_smoothing", "gamma", "desirable_weight", "undesirable_weight"):
        if getattr(cfg, knob) != getattr(defaults, knob) and knob not in entry.params:
            users = [n for n, e in PREFERENCE_LOSSES.items() if knob in e.params]
            raise UserError(f"{knob}={getattr(cfg, knob)} does nothing with loss={cfg.loss}: only "
                            f"{', '.join(users)} read it; remove it or choose one of those losses")
    common.require_file(cfg.policy, "policy", "the SFT model directory (run/sft/model)")
    if cfg.reward_model:
        common.require_file(cfg.reward_model, "reward_model", "the reward model directory (run/reward/model)")
    if cfg.online.enabled:
        if cfg.train_file:
            raise UserError("train_file is not read by online DPO (online.enabled=true), which learns from "
                            "its own labelled samples of prompts_file; remove train_file")
        common.require_file(cfg.prompts_file, "prompts_file", "the prompts online DPO samples: "
                            "`ppo-rlhf data --task arithmetic --out DIR` writes prompts_train.jsonl")
        if not cfg.reward_model and not cfg.online.functions:
            raise UserError("online DPO labels its pairs with reward_model or online.functions: give the "
                            "reward model directory (run/reward/model), reward functions, or both")
        common.check_batch(cfg.online.prompts_per_round, 1, "online.prompts_per_round")
    else:
        changed = [f"online.{k}" for k, v in to_dict(cfg.online).items() if v != getattr(OnlineDPOConfig(), k)]
        if changed:
            raise UserError(f"{', '.join(changed)} is only read by online DPO: set online.enabled=true or remove it")
        if cfg.prompts_file:
            raise UserError("prompts_file is only read by online DPO: set online.enabled=true or remove it")
        common.require_file(cfg.train_file, "train_file", "a preference JSONL: `ppo-rlhf data --task arithmetic "
                            "--out DIR` writes prefs_train.jsonl")
    if entry.needs_mismatched and cfg.batch_size < 2:
        raise UserError(f"loss={cfg.loss} pairs each prompt with another pair's responses: batch_size must be "
                        "at least 2")
    common.check_batch(cfg.batch_size, cfg.grad_accum, "batch_size")
    if cfg.eval_prompts_file:
        common.require_file(cfg.eval_prompts_file, "eval_prompts_file")


def run_dpo(cfg: DPOConfig, resume: bool = False) -> dict:
    """Train the policy with the configured preference loss; returns the stage summary."""
    out_dir = Path(common.require(cfg.out_dir, "out_dir", "where to write the DPO policy"))
    check_config(cfg)
    device = common.setup(cfg.run, "dpo", model=cfg.policy)
    t_start = time.time()
    stage = DPOStage(cfg, device)
    loop = StageLoop(stage, out_dir, cfg.run)
    if (done := loop.begin(resume)) is not None:
        return done
    if loop.step == 0:
        if dist.is_main():
            for line in stage.truncation:
                print(f"[dpo] {line}")
        if cfg.run.eval_every:
            loop.evaluate()
    if not loop.run():
        return {"stopped_at": loop.step}
    final = loop.evaluate()
    summary = {"stage": "dpo", "loss": cfg.loss, "online": cfg.online.enabled, "beta": stage.loss_params.beta,
               "steps": stage.total_steps, "skipped_steps": loop.guard.skipped_total,
               **{k.split("/", 1)[1].replace("loss", "pair_loss"): v for k, v in final.items()}}
    if not cfg.online.enabled:
        summary["train_pairs"] = stage.data.n
    exported = dist.plain_copy(stage.model)  # on every rank: FSDP gathers the shards to rank 0
    if dist.is_main():
        save_model(exported, stage.tokenizer, out_dir / "model")  # merges a copy of a LoRA model
        summary.update(seconds=time.time() - t_start, config=to_dict(cfg))
        write_summary(out_dir, summary)
    loop.close()
    return summary
