"""Stage 3, PPO: optimise the policy against the reward model with a KL penalty to the SFT model.

    ppo-rlhf ppo policy=run/sft/model reward_model=run/reward/model \
        prompts_file=data/prompts_train.jsonl eval_prompts_file=data/prompts_eval.jsonl \
        task=arithmetic out_dir=run/ppo

Each iteration: sample a rollout from pi_theta (which is pi_old for this iteration), score it
(old log-probs, reference log-probs, values, RM score), build rewards r_t = -beta*KL_t (+ score at the
last token), GAE advantages/returns, then `ppo_epochs` passes of `num_minibatches` optimizer steps
on L = L_CLIP + c1*L_VF + c2*L_LM - c_H*H. The math lives in `ppo_rlhf.algo`; this file is the loop.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..algo.advantages import RunningMeanStd, explained_variance, masked_mean
from ..algo.kl_control import make_kl_controller
from ..algo.losses import lm_loss, policy_loss, value_loss
from ..checkpoint import CheckpointManager, rng_state, set_rng_state
from ..config import PPOConfig, to_dict
from ..data.collate import pad_left, pad_right, position_ids_from_mask
from ..data.encode import check_token_ids, encode_prompts
from ..data.jsonl import read_prompts, read_texts
from ..errors import UserError
from ..generation import response_logprobs, response_values
from ..guards import GracefulStop, NonFiniteGuard
from ..metrics import MetricsLogger, PhaseTimer, Progress, write_summary
from ..models import adapters_disabled, apply_lora, disable_dropout, load_causal_lm, load_scalar_model, save_model
from ..rollout import Experience, make_experience, sample, sequence_kl
from ..tasks import get_task
from ..tokenizer import load_tokenizer
from . import common
from .evaluate import decode_responses, evaluate_policy, load_eval_prompts


def minibatch_indices(n: int, num_minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled split of range(n) into num_minibatches parts whose sizes differ by at most one
    (so with n >= world * num_minibatches * grad_accum every rank gets grad_accum rows of each)."""
    perm = torch.randperm(n, generator=generator)
    return [chunk for chunk in perm.tensor_split(num_minibatches) if chunk.numel()]


def ppo_losses(policy, value_model, exp: Experience, idx: torch.Tensor, cfg: PPOConfig,
               update_policy: bool, update_value: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_CLIP + c1*L_VF - c_H*H on the rows `idx` of the experience; stats are detached."""
    seq, mask, rmask = exp.sequences[idx], exp.attention_mask[idx], exp.response_mask[idx]
    P = exp.prompt_len
    total = torch.zeros((), device=seq.device)
    stats: dict[str, torch.Tensor] = {}
    if update_policy:
        logprobs, entropy = response_logprobs(policy, seq, mask, P, temperature=cfg.rollout.temperature,
                                              with_entropy=cfg.loss.entropy_coef > 0)
        pg_loss, pg_stats = policy_loss(logprobs, exp.logprobs[idx], exp.advantages[idx], rmask,
                                        cfg.loss.clip_eps)
        total = total + pg_loss
        stats["loss/policy"] = pg_loss.detach()
        stats.update({f"policy/{k}": torch.as_tensor(v) for k, v in pg_stats.items()})
        if cfg.loss.entropy_coef > 0:
            ent = masked_mean(entropy, rmask)
            total = total - cfg.loss.entropy_coef * ent
            stats["loss/entropy"] = ent.detach()
    if update_value:
        values = response_values(value_model, seq, mask, P).float()
        vf_loss, vf_stats = value_loss(values, exp.values[idx], exp.returns[idx], rmask,
                                       cfg.loss.value_clip_eps or None)
        total = total + cfg.loss.vf_coef * vf_loss
        stats["loss/value"] = vf_loss.detach()
        stats.update({f"value/{k}": torch.as_tensor(v) for k, v in vf_stats.items()})
    return total, stats


def ptx_loss(policy, texts: list[list[int]], rows: list[int], pad_id: int, device) -> torch.Tensor:
    """PPO-ptx: next-token LM loss of the policy on pretraining sequences."""
    ids, mask = pad_right([texts[i] for i in rows], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return lm_loss(logits[:, :-1].float(), ids[:, 1:], mask[:, 1:])


class PPOTrainer:
    """Holds the four models, the optimisers and the controllers; `iteration()` is one PPO step."""

    def __init__(self, cfg: PPOConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        common.require_file(cfg.policy, "policy", "the SFT model directory (run/sft/model)")
        common.require_file(cfg.reward_model, "reward_model", "the reward model directory (run/reward/model)")
        common.require_file(cfg.prompts_file, "prompts_file", "a prompts JSONL: `ppo-rlhf data --task arithmetic --out DIR`")
        if cfg.loss.ptx_coef > 0:
            common.require_file(cfg.ptx_file, "ptx_file", "pretraining text JSONL {\"text\"}, needed when loss.ptx_coef > 0")
        common.check_batch(cfg.rollout.batch_size, 1, "rollout.batch_size")
        if cfg.rollout.batch_size // dist.world_size() < cfg.train.num_minibatches * cfg.train.grad_accum:
            raise UserError("rollout.batch_size per rank must be at least train.num_minibatches * "
                            f"train.grad_accum ({cfg.train.num_minibatches} * {cfg.train.grad_accum})")
        if cfg.loss.ptx_coef > 0:
            common.check_batch(cfg.loss.ptx_batch_size, 1, "loss.ptx_batch_size")
        tok = self.tokenizer = load_tokenizer(cfg.policy)
        self.task = get_task(cfg.task) if cfg.task else None
        self.max_new_tokens = cfg.rollout.max_new_tokens or (self.task.default_max_new_tokens if self.task else 32)

        self.policy = load_causal_lm(cfg.policy, tok).to(device)
        self.use_lora = cfg.model.lora_r > 0
        if self.use_lora:
            self.policy = apply_lora(self.policy, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout)
            self.reference = None
        else:
            self.reference = load_causal_lm(cfg.policy, tok).to(device)
            self.reference.requires_grad_(False)
        self.reward_model = load_scalar_model(cfg.reward_model, tok).to(device)
        self.reward_model.requires_grad_(False)
        self.value_model = load_scalar_model(cfg.reward_model, tok).to(device)
        if cfg.train.value_model == "policy_head":
            if self.use_lora or dist.world_size() > 1 or cfg.run.fsdp:
                raise UserError("train.value_model=policy_head needs one process and no LoRA; "
                                "use train.value_model=separate")
            # V_phi is a head (initialised from the RM's) on the policy's own trunk: the trunk learns
            # from both losses and is stepped by the policy optimizer; the value optimizer owns the head.
            setattr(self.value_model, self.value_model.base_model_prefix, self.policy.base_model)
        for m in (self.policy, self.reference, self.reward_model, self.value_model):
            if m is not None:
                disable_dropout(m)
                m.eval()

        examples, _ = read_prompts(cfg.prompts_file)
        self.prompt_ids, trunc = encode_prompts(tok, examples, cfg.max_prompt_len)
        check_token_ids(self.prompt_ids[0], self.policy.config.vocab_size, cfg.prompts_file)
        self.truncation = trunc.describe() if (trunc.prompts_truncated or trunc.dropped) else ""
        self.eval_prompts = (load_eval_prompts(cfg.eval_prompts_file, tok, cfg.max_prompt_len, cfg.eval_samples)
                             if cfg.eval_prompts_file else None)
        self.prompt_texts = [e.prompt if isinstance(e.prompt, str) else e.prompt[-1]["content"] for e in examples]
        self.ptx_ids: list[list[int]] = []
        if cfg.loss.ptx_coef > 0:
            texts, _ = read_texts(cfg.ptx_file)
            max_len = cfg.max_prompt_len + self.max_new_tokens
            self.ptx_ids = [ids[:max_len] for ids in
                            tok([t.text for t in texts], add_special_tokens=False)["input_ids"] if ids]

        # Before the optimizers: FSDP swaps the parameters (and shards the frozen models too).
        self.policy_ddp = dist.wrap_model(self.policy, device, cfg.run)
        self.value_ddp = dist.wrap_model(self.value_model, device, cfg.run)
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                dist.wrap_model(frozen, device, cfg.run)
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.value_params = [p for p in self.value_model.parameters() if p.requires_grad]
        if cfg.train.value_model == "policy_head":
            trunk = {id(p) for p in self.policy.parameters()}
            self.value_params = [p for p in self.value_params if id(p) not in trunk]
        steps = cfg.train.updates * cfg.train.ppo_epochs * cfg.train.num_minibatches
        self.policy_opt = common.make_optimizer(self.policy_params, cfg.optim)
        self.value_opt = common.make_optimizer(self.value_params, cfg.optim, lr=cfg.train.value_lr or cfg.optim.lr)
        self.policy_sched = common.make_scheduler(self.policy_opt, cfg.optim, steps)
        self.value_sched = common.make_scheduler(self.value_opt, cfg.optim, steps)
        self.kl_ctl = make_kl_controller(cfg.reward.kl_control, cfg.reward.kl_coef, cfg.reward.kl_target,
                                         cfg.reward.kl_horizon)
        self.running = RunningMeanStd() if cfg.reward.normalize else None
        self.guard = NonFiniteGuard(cfg.run.max_nonfinite)
        self.gen = torch.Generator(device=device)
        self.shuffle_gen = torch.Generator()
        self.step = 0
        self.last_checkpoint: Path | None = None  # named by the non-finite guard when it gives up

    # -- state for checkpoints ------------------------------------------------------------------
    def state(self) -> dict:
        return {"policy": self.policy, "value_model": self.value_model,
                "policy_optimizer": self.policy_opt, "value_optimizer": self.value_opt,
                "policy_scheduler": self.policy_sched, "value_scheduler": self.value_sched,
                "kl_controller": self.kl_ctl, "step": self.step, "rng": rng_state(),
                "generator": self.gen.get_state(), "shuffle_generator": self.shuffle_gen.get_state(),
                "running": self.running.state_dict() if self.running else None,
                **common.guard_state(self.guard)}

    def load(self, values: dict) -> None:
        self.step = values["step"]
        set_rng_state(values["rng"])
        self.gen.set_state(values["generator"])
        self.shuffle_gen.set_state(values["shuffle_generator"])
        if self.running is not None and values.get("running"):
            self.running.load_state_dict(values["running"])
        common.load_guard_state(self.guard, values)
        common.use_config_lr(self.policy_opt, self.policy_sched, self.cfg.optim.lr)
        common.use_config_lr(self.value_opt, self.value_sched, self.cfg.train.value_lr or self.cfg.optim.lr)

    def reference_ctx(self):
        return (lambda: adapters_disabled(self.policy)) if self.use_lora else None

    # -- one iteration -------------------------------------------------------------------------------
    def iteration(self, prompt_rows: list[int], timer: PhaseTimer) -> tuple[dict[str, float], list[dict]]:
        """One PPO step on the global rollout batch `prompt_rows` (prompt indices, all ranks alike).

        Each rank samples and scores its shard (`dist.shard`); the experience is then gathered in
        global order, so minibatches and statistics are those of one process with the whole
        batch. Row i samples from its own stream, seeded from a per-update seed and i, so the
        rollout does not depend on the world size either.
        """
        cfg, tok, dev = self.cfg, self.tokenizer, self.device
        mine = dist.shard(range(len(prompt_rows)))
        # One prompt width and response length on all ranks, so that the experience can be gathered.
        width = max(len(self.prompt_ids[i]) for i in prompt_rows)
        prompt_ids, prompt_mask = pad_left([self.prompt_ids[prompt_rows[j]] for j in mine], tok.pad_token_id, width)
        prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
        base_seed = int(torch.randint(2**62, (1,), generator=self.gen, device=self.gen.device))
        with timer("generate"), common.autocast(dev, cfg.run.dtype), dist.full_params(self.policy):
            resp, resp_mask, logprobs, entropy = sample(
                self.policy, prompt_ids, prompt_mask, cfg, self.max_new_tokens, tok.eos_token_id,
                tok.pad_token_id, row_seeds=[base_seed + j for j in mine])
            extra = int(dist.all_reduce_max(torch.tensor(resp.size(1)))) - resp.size(1)
            resp = F.pad(resp, (0, extra), value=tok.pad_token_id)
            resp_mask = F.pad(resp_mask, (0, extra), value=False)
            logprobs, entropy = (F.pad(t, (0, extra), value=0.0) for t in (logprobs, entropy))
        with timer("score"), common.autocast(dev, cfg.run.dtype):
            exp = make_experience(self.policy, self.reference, self.value_model, self.reward_model,
                                  prompt_ids, prompt_mask, resp, resp_mask, cfg, self.kl_ctl.value,
                                  tok.eos_token_id, self.running, self.reference_ctx(), logprobs, entropy)
            exp = Experience(*(dist.gather_shards(t) for t in exp))
        with timer("train"):
            train_stats = self.update(exp)
        seq_kl = sequence_kl(exp.logprobs, exp.ref_logprobs, exp.response_mask)
        mean_kl = seq_kl.mean().item()
        beta = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, len(prompt_rows))

        # Text is needed for the gold reward (every row) and the sample table (the first rows only).
        n_text = len(prompt_rows) if self.task is not None else min(cfg.sample_rows, len(prompt_rows))
        texts, truncated = decode_responses(tok, exp.sequences[:n_text, exp.prompt_len:].cpu(),
                                            exp.response_mask[:n_text].cpu())
        m = {"objective/kl": mean_kl,
             "objective/kl_estimator_mean": (exp.kl * exp.response_mask).sum(1).mean().item(),
             "objective/rlhf_reward": (exp.rewards.sum(1)).mean().item(),
             "objective/rm_score": exp.rm_scores.mean().item(),
             "objective/score": exp.scores.mean().item(),
             "objective/non_score_reward": (-beta * exp.kl * exp.response_mask).sum(1).mean().item(),
             "objective/entropy": masked_mean(exp.entropy, exp.response_mask).item(),
             "kl_ctl/beta": beta,
             "rollout/response_length": exp.response_mask.sum(1).float().mean().item(),
             "rollout/truncated_frac": exp.truncated.float().mean().item(),
             "value/explained_variance": explained_variance(exp.values, exp.returns, exp.response_mask),
             "value/mean": masked_mean(exp.values, exp.response_mask).item(),
             "returns/mean": masked_mean(exp.returns, exp.response_mask).item()}
        if self.task is not None:
            golds = [self.task.gold_reward(self.prompt_texts[i], t, truncated=tr)
                     for i, t, tr in zip(prompt_rows, texts, truncated)]
            m["objective/gold_reward"] = sum(golds) / len(golds)
        m.update(train_stats)
        rows = [{"prompt": self.prompt_texts[i], "response": t, "rm_score": s}
                for i, t, s in zip(prompt_rows[:cfg.sample_rows], texts, exp.rm_scores.tolist())]
        return m, rows

    def update(self, exp: Experience) -> dict[str, float]:
        """ppo_epochs x num_minibatches optimizer steps (each minibatch split into grad_accum
        micro-batches whose losses are weighted by their share of the minibatch's tokens)."""
        cfg = self.cfg
        it = self.step
        update_value = it % cfg.train.value_update_every == 0
        update_policy = it >= cfg.train.critic_warmup_updates
        sums: dict[str, float] = {}
        n_steps = 0
        early_stop = False
        B = exp.sequences.size(0)
        world = dist.world_size()
        for _epoch in range(cfg.train.ppo_epochs):
            for mb in minibatch_indices(B, cfg.train.num_minibatches, self.shuffle_gen):
                # The experience is global (see `iteration`): the minibatch is the same on every
                # rank, and each rank trains on its share, weighted by its share of the tokens.
                mb = mb.to(exp.sequences.device)
                mb_tokens = exp.response_mask[mb].sum().float().clamp(min=1)
                mb_stats: dict[str, torch.Tensor] = {"loss/total": torch.zeros((), device=self.device)}
                mb_max: dict[str, float] = {}
                for micro in mb[dist.rank()::world].tensor_split(cfg.train.grad_accum):
                    share = exp.response_mask[micro].sum().float() / mb_tokens
                    with common.autocast(self.device, cfg.run.dtype):
                        loss, stats = ppo_losses(self.policy_ddp, self.value_ddp, exp, micro, cfg,
                                                 update_policy, update_value)
                    # DDP averages gradients over ranks, hence the world-size factor.
                    (loss * share * world).backward()
                    mb_stats["loss/total"] += loss.detach() * share
                    for k, v in stats.items():
                        if k.endswith("_max"):
                            mb_max[k] = max(mb_max.get(k, float("-inf")), float(v))
                        else:
                            mb_stats[k] = mb_stats.get(k, 0.0) + v.float() * share
                if cfg.loss.ptx_coef > 0 and update_policy and self.ptx_ids:
                    g = torch.Generator().manual_seed(cfg.run.seed * 7919 + self.step * 131 + n_steps)
                    rows = torch.randint(len(self.ptx_ids), (cfg.loss.ptx_batch_size,), generator=g).tolist()
                    mine = dist.shard(rows)
                    share = sum(len(self.ptx_ids[i]) - 1 for i in mine) / max(1, sum(len(self.ptx_ids[i]) - 1 for i in rows))
                    lm = ptx_loss(self.policy_ddp, self.ptx_ids, mine, self.tokenizer.pad_token_id, self.device)
                    (cfg.loss.ptx_coef * lm * share * world).backward()
                    mb_stats["loss/ptx"] = lm.detach() * share
                    mb_stats["loss/total"] += cfg.loss.ptx_coef * lm.detach() * share
                reduced = {**dist.all_reduce_dict(mb_stats), **dist.all_reduce_dict(mb_max, op="max")}
                loss_total = torch.tensor(reduced.pop("loss/total"))
                if update_policy:
                    ok, gn = common.clip_and_step(self.policy_params, self.policy_opt, self.policy_sched,
                                                  cfg.optim.max_grad_norm, self.guard, loss_total,
                                                  step=self.step + 1, last_checkpoint=self.last_checkpoint)
                    reduced["policy/grad_norm"] = gn
                if update_value:
                    ok, gn = common.clip_and_step(self.value_params, self.value_opt, self.value_sched,
                                                  cfg.optim.max_grad_norm, self.guard, loss_total,
                                                  step=self.step + 1, last_checkpoint=self.last_checkpoint)
                    reduced["value/grad_norm"] = gn
                if not update_policy:  # critic warm-up: drop what the value loss left on a shared trunk
                    self.policy_opt.zero_grad(set_to_none=True)
                for k, v in reduced.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_steps += 1
                if cfg.train.target_kl and update_policy and reduced.get("policy/approx_kl", 0.0) > cfg.train.target_kl:
                    early_stop = True
                    break
            if early_stop:
                break
        out = {k: v / max(1, n_steps) for k, v in sums.items()}
        out.update({"train/optimizer_steps": n_steps, "train/early_stopped": float(early_stop),
                    "train/lr": self.policy_sched.get_last_lr()[0],
                    "train/skipped_steps": self.guard.skipped_total})
        return out


def run_ppo(cfg: PPOConfig, resume: bool = False) -> dict:
    out_dir = Path(common.require(cfg.out_dir, "out_dir", "where to write the PPO policy"))
    device = common.setup(cfg.run)
    t_start = time.time()
    trainer = PPOTrainer(cfg, device)
    ckpt = CheckpointManager(out_dir, keep_last=cfg.run.keep_last, enabled=dist.is_main())
    if resume and (path := ckpt.latest_valid()) is not None:
        trainer.load(ckpt.load(path, dist.for_loading(trainer.state())))
        trainer.last_checkpoint = path
        if (done := common.finished_summary(out_dir, trainer.step, cfg.train.updates, "ppo")) is not None:
            return done
    else:
        trainer.gen.manual_seed(cfg.run.seed)  # the same on every rank: it seeds the global rollout
        trainer.shuffle_gen.manual_seed(cfg.run.seed + 17)
    logger = MetricsLogger(out_dir, enabled=dist.is_main(), tensorboard=cfg.run.tensorboard,
                           wandb_project=cfg.run.wandb_project or None,
                           console_every=max(1, cfg.train.updates // 10))
    # Drop what an interrupted attempt logged after the checkpoint (all of it when starting afresh).
    logger.truncate_after(trainer.step if trainer.step else -1)
    if not trainer.step and trainer.truncation and dist.is_main():
        print(f"[ppo] {cfg.prompts_file}: {trainer.truncation}")

    def evaluate(step: int) -> dict:
        if trainer.eval_prompts is None:
            return {}
        with dist.full_params(trainer.policy, trainer.reward_model, trainer.reference):
            res = evaluate_policy(trainer.policy, trainer.tokenizer, trainer.eval_prompts, task=cfg.task,
                                  device=device, reward_model=trainer.reward_model,
                                  reference=trainer.reference, reference_ctx=trainer.reference_ctx(),
                                  max_new_tokens=trainer.max_new_tokens, temperature=cfg.rollout.temperature,
                                  seed=cfg.run.seed + 99, sample_rows=cfg.sample_rows)
        metrics = {f"eval/{k}": v for k, v in res.items() if isinstance(v, float)}
        logger.log(step, metrics, stage="ppo")
        logger.log_samples(step, [dict(r, step=step) for r in res["samples"]])
        return metrics

    if trainer.step == 0 and cfg.run.eval_every:
        evaluate(0)
    timer = PhaseTimer()
    progress = Progress(cfg.train.updates - trainer.step, "ppo", enabled=dist.is_main())
    batches = common.global_batches(len(trainer.prompt_ids), cfg.rollout.batch_size, cfg.run.seed, trainer.step)
    last_eval: dict = {}
    with GracefulStop() as stop:
        while trainer.step < cfg.train.updates:
            rows = next(batches)
            timer.reset()
            t0 = time.time()
            metrics, samples = trainer.iteration(rows, timer)
            trainer.step += 1
            dt = time.time() - t0
            # tokens processed = prompt + response tokens of the whole (global) rollout
            n_tokens = sum(len(trainer.prompt_ids[i]) for i in rows) + metrics["rollout/response_length"] * len(rows)
            metrics.update(timer.totals())
            metrics.update({"perf/tokens_per_s": n_tokens / dt, "perf/seconds_per_update": dt,
                            "perf/samples": trainer.step * cfg.rollout.batch_size})
            if torch.cuda.is_available() and device.type == "cuda":
                metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if trainer.step % cfg.run.log_every == 0:
                logger.log(trainer.step, metrics, stage="ppo")
            progress.update(kl=f"{metrics['objective/kl']:.2f}", rm=f"{metrics['objective/rm_score']:.2f}",
                            **({"gold": f"{metrics['objective/gold_reward']:.2f}"} if "objective/gold_reward" in metrics else {}))
            if cfg.run.eval_every and trainer.step % cfg.run.eval_every == 0 and trainer.step < cfg.train.updates:
                last_eval = evaluate(trainer.step)
            stopping = dist.any_rank(stop.requested)  # all ranks stop at the same step
            if (cfg.run.save_every and trainer.step % cfg.run.save_every == 0) or stopping:
                trainer.last_checkpoint = ckpt.save(trainer.step, dist.for_saving(trainer.state()))
            if stopping:
                progress.close()
                logger.close()
                print(f"[ppo] stopped at update {trainer.step}; resume with: {common.resume_command('ppo')}")
                return {"stopped_at": trainer.step}
    progress.close()
    if trainer.last_checkpoint != ckpt.path_for(trainer.step):  # not saved by the loop; before the LoRA merge
        trainer.last_checkpoint = ckpt.save(trainer.step, dist.for_saving(trainer.state()))
    last_eval = evaluate(trainer.step) or last_eval
    summary = {"stage": "ppo", "updates": cfg.train.updates, "final_beta": trainer.kl_ctl.value,
               "skipped_steps": trainer.guard.skipped_total, **{k.split("/", 1)[1]: v for k, v in last_eval.items()}}
    # on every rank: FSDP gathers the shards to rank 0
    policy, value_model = dist.plain_copy(trainer.policy), dist.plain_copy(trainer.value_model)
    if dist.is_main():
        save_model(policy, trainer.tokenizer, out_dir / "model")
        save_model(value_model, trainer.tokenizer, out_dir / "value_model")
        summary.update(seconds=time.time() - t_start, config=to_dict(cfg))
        write_summary(out_dir, summary)
    logger.close()
    dist.barrier()
    return summary
