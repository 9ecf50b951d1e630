"""Stage 2, reward model: a scalar head on the SFT trunk, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected); K-way rankings arrive as all C(K,2) pairs.

    ppo-rlhf reward train_file=data/prefs_train.jsonl eval_file=data/prefs_eval.jsonl \
        model.path=run/sft/model out_dir=run/reward

After training the score is normalised (gain/bias stored in the model's config) so that the SFT
policy's own responses, sampled at the RL stage's temperature (`norm_temperature`), score mean 0,
std 1 -- the scale PPO's KL coefficient is tuned for.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import distributed as dist
from ..algo.losses import pairwise_rm_loss
from ..config import RewardConfig, to_dict
from ..data.collate import PaddedSet, collate_pairs, collate_prompts, padded_pairs, pair_rows
from ..data.encode import check_token_ids, encode_pairs
from ..data.jsonl import read_preferences
from ..generation import generate, sequence_rewards
from ..metrics import write_summary
from ..models import (
    apply_lora,
    check_same_tokenizer,
    load_causal_lm,
    load_scalar_model,
    save_model,
    set_reward_normalisation,
)
from ..tokenizer import load_tokenizer
from . import common
from .evaluate import load_eval_prompts
from .loop import StageLoop, StepResult


def pair_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen (first half of the rows) and rejected (second half) sequences."""
    scores = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    half = scores.size(0) // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def evaluate_pairs(model, pairs: PaddedSet, batch_size: int, device) -> dict[str, float]:
    """Held-out pairwise accuracy and loss (ties count as wrong), combined over ranks.
    `pairs`: a `padded_pairs` set."""
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    n_pairs = len(pairs) // 2
    longer = torch.maximum(pairs.lengths[:n_pairs], pairs.lengths[n_pairs:])
    # by length, so that a batch holds little padding (the sums do not depend on the order)
    mine = dist.shard(longer.argsort(stable=True).tolist())
    with dist.full_params(model):  # ranks may run different numbers of batches
        for i in range(0, len(mine), batch_size):
            rows = pair_rows(mine[i:i + batch_size], n_pairs)
            batch = {k: v.to(device) for k, v in pairs.batch(rows).items()}
            chosen, rejected = pair_scores(model, batch)
            loss, acc = pairwise_rm_loss(chosen.float(), rejected.float())
            n = chosen.size(0)
            total += torch.tensor([float(loss) * n, float(acc) * n, n], dtype=torch.float64)
    total = dist.all_reduce_sum(total)
    n = total[2].clamp(min=1)
    return {"loss": (total[0] / n).item(), "accuracy": (total[1] / n).item()}


@torch.no_grad()
def normalisation_scores(cfg: RewardConfig, model, tokenizer, train_pairs, device) -> torch.Tensor:
    """Raw scores of the reference set: SFT-policy samples on prompts, or the training responses."""
    model.eval()
    pad = tokenizer.pad_token_id
    scores = []
    if cfg.norm_prompts_file:
        policy = load_causal_lm(cfg.norm_policy or cfg.model.path, tokenizer).to(device).eval()
        prompts = load_eval_prompts(cfg.norm_prompts_file, tokenizer, cfg.max_prompt_len, cfg.norm_samples)
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
        for i in range(0, len(prompts.ids), cfg.batch_size):
            b = collate_prompts(prompts.ids[i:i + cfg.batch_size], pad)
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            resp, resp_mask = generate(policy, ids, mask, max_new_tokens=cfg.max_new_tokens,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                                       temperature=cfg.norm_temperature, generator=gen)
            scores.append(sequence_rewards(model, torch.cat([ids, resp], 1), torch.cat([mask, resp_mask], 1)))
    else:
        for i in range(0, min(len(train_pairs), cfg.norm_samples), cfg.batch_size):
            b = collate_pairs(train_pairs[i:i + cfg.batch_size], pad)
            scores.append(sequence_rewards(model, b["input_ids"].to(device), b["attention_mask"].to(device)))
    return torch.cat(scores).float().cpu()


class RewardStage(common.Training):
    """Reward-model training for the stage loop (loop.py): a step is one optimizer step on a
    global batch of pairs; the loss is the mean over the batch's pairs."""

    name, command, unit = "reward", "reward", "step"

    def __init__(self, cfg: RewardConfig, model, train: PaddedSet, evalset: PaddedSet | None, device,
                 total_steps: int):
        super().__init__(model, cfg.optim, cfg.run, device, total_steps)
        self.cfg, self.train, self.evalset, self.device = cfg, train, evalset, device
        self.n_pairs = len(train) // 2
        # a pair's batch is padded to the longer of its two sequences
        self.pair_lengths = torch.maximum(train.lengths[:self.n_pairs], train.lengths[self.n_pairs:])
        self.dtype = common.compute_dtype(cfg.run, device, cfg.model.path)

    def step(self, ctx) -> StepResult:
        cfg = self.cfg
        self.model.train()
        global_idx = common.bucketed_batch(self.pair_lengths, cfg.batch_size, cfg.run.seed, ctx.step - 1,
                                           cfg.bucket_batches)
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss and accuracy sums
        for micro in common.micro_batches(dist.shard(global_idx), cfg.grad_accum):
            batch = self.train.batch(pair_rows(micro, self.n_pairs))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with common.autocast(self.device, self.dtype):
                chosen, rejected = pair_scores(self.ddp_model, batch)
            loss, acc = pairwise_rm_loss(chosen.float(), rejected.float(), margin=cfg.margin or None)
            # mean over the global batch: weight each micro-batch by its share of it
            (loss * len(micro) * dist.world_size() / len(global_idx)).backward()
            stats += torch.stack([loss.detach().double(), torch.tensor(acc, dtype=torch.float64,
                                                                        device=self.device)]) * len(micro)
        stats = dist.all_reduce_sum(stats) / len(global_idx)
        _, gnorm = self.optimizer_step(ctx, stats[0].float())
        return StepResult({"rm/train_loss": stats[0], "rm/train_acc": stats[1], "rm/grad_norm": gnorm,
                           "rm/lr": self.sched.get_last_lr()[0], "rm/skipped_steps": ctx.guard.skipped_total},
                          progress={"loss": f"{stats[0].item():.3f}", "acc": f"{stats[1].item():.2f}"})

    def evaluate(self, step: int, model=None) -> StepResult:
        """Held-out pairwise loss and accuracy of `model` (default: the one being trained)."""
        if self.evalset is None:
            return StepResult({})
        ev = evaluate_pairs(model or self.model, self.evalset, self.cfg.batch_size, self.device)
        return StepResult({"rm/eval_loss": ev["loss"], "rm/eval_acc": ev["accuracy"]})


def run_reward(cfg: RewardConfig, resume: bool = False) -> dict:
    out_dir = Path(common.require(cfg.out_dir, "out_dir", "where to write the reward model"))
    common.require_file(cfg.train_file, "train_file", "make one with `ppo-rlhf data --task arithmetic --out DIR`")
    common.check_batch(cfg.batch_size, cfg.grad_accum, "batch_size")
    device = common.setup(cfg.run, "reward", model=cfg.model.path)
    t_start = time.time()

    tokenizer = load_tokenizer(common.tokenizer_source(cfg.model))
    if cfg.norm_prompts_file and cfg.norm_policy:  # its samples are scored by this RM
        check_same_tokenizer(cfg.norm_policy, "normalisation policy (norm_policy)", tokenizer,
                             "reward model")
    pairs_raw, _ = read_preferences(cfg.train_file)
    train, trunc = encode_pairs(tokenizer, pairs_raw, cfg.max_prompt_len, cfg.max_len)
    evalset = []
    if cfg.eval_file:
        eval_raw, _ = read_preferences(cfg.eval_file)
        evalset, _ = encode_pairs(tokenizer, eval_raw, cfg.max_prompt_len, cfg.max_len)

    model = load_scalar_model(cfg.model.path, tokenizer, init_from_causal_lm=True,
                              head_init_std=cfg.head_init_std, seed=cfg.run.seed).to(device)
    check_token_ids(train, model.config.vocab_size, cfg.train_file)  # every record: a max id each
    check_token_ids(evalset, model.config.vocab_size, cfg.eval_file)
    if cfg.model.lora_r:
        model = apply_lora(model, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout)
    steps = common.total_steps(len(train), cfg.batch_size, cfg.epochs, cfg.max_steps)
    pad = tokenizer.pad_token_id
    stage = RewardStage(cfg, model, padded_pairs(train, pad), padded_pairs(evalset, pad) if evalset else None,
                        device, steps)
    loop = StageLoop(stage, out_dir, cfg.run)
    if (done := loop.begin(resume)) is not None:  # --resume found the run finished
        return done
    if dist.is_main() and (trunc.prompts_truncated or trunc.responses_truncated or trunc.dropped):
        print(f"[reward] {cfg.train_file}: {trunc.describe()}")
    if not loop.run():  # the final checkpoint is saved before the LoRA merge changes the model
        return {"stopped_at": loop.step}

    final = model.merge_and_unload() if cfg.model.lora_r else model
    summary = {"stage": "reward", "steps": steps, "train_pairs": len(train), "truncation": trunc.describe(),
               "skipped_steps": loop.guard.skipped_total}
    if evalset:
        result = stage.evaluate(steps, final)
        loop.log(result)
        summary.update(eval_accuracy=result.metrics["rm/eval_acc"], eval_loss=result.metrics["rm/eval_loss"],
                       eval_pairs=len(evalset))
    with dist.full_params(final):
        raw = normalisation_scores(cfg, final, tokenizer, train, device)
    set_reward_normalisation(final, raw)
    gain, bias = final.config.reward_gain, final.config.reward_bias
    summary.update(reward_gain=gain, reward_bias=bias, raw_score_mean=raw.mean().item(),
                   raw_score_std=raw.std().item())
    exported = dist.plain_copy(final)  # on every rank: FSDP gathers the shards to rank 0
    if dist.is_main():
        save_model(exported, tokenizer, out_dir / "model")
        summary.update(seconds=time.time() - t_start, config=to_dict(cfg))
        write_summary(out_dir, summary)
    loop.close()
    return summary
