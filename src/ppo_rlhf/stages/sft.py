"""Stage 1, SFT: fine-tune a causal LM on demonstrations with the loss on response tokens only.

    ppo-rlhf sft train_file=data/sft_train.jsonl eval_file=data/sft_eval.jsonl \
        model.path=tiny-gpt2 model.tokenizer=run/tokenizer out_dir=run/sft

The loss of a step is the sum of token losses over the whole global batch divided by its number of
response tokens, however the batch is split into micro-batches and ranks -- so gradient
accumulation and DDP compute exactly what one big batch would.
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..config import SFTConfig, to_dict
from ..data.collate import PaddedSet, padded_sft, position_ids_from_mask
from ..data.encode import check_token_ids, encode_sft
from ..data.jsonl import read_sft
from ..metrics import write_summary
from ..models import apply_lora, load_causal_lm, save_model, unwrap
from ..tokenizer import load_tokenizer
from . import common
from .evaluate import evaluate_policy, load_eval_prompts
from .loop import StageLoop, StepResult


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over loss-mask tokens, and their count. Shapes: batch (B, T).

    The LM head runs only at the positions where some row predicts a loss token (HF's
    `logits_to_keep`): the prompt positions need no logits, and the head over the vocabulary is
    as large as a transformer block's MLP.
    """
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    weights = loss_mask[:, 1:]  # position t predicts token t + 1
    keep = weights.any(0).nonzero().squeeze(1)  # (K,)
    kwargs = {"logits_to_keep": keep} if _takes_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False, **kwargs)
    logits = out.logits.float() if kwargs else out.logits[:, keep].float()  # (B, K, V)
    targets, weights = ids[:, keep + 1], weights[:, keep]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    nll = nll.view_as(targets) * weights
    return nll.sum(), weights.sum()


def _takes_logits_to_keep(model) -> bool:
    """Whether the HF model inside `model` (DDP, peft) accepts `logits_to_keep` positions."""
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


@torch.no_grad()
def eval_loss(model, evalset: PaddedSet, batch_size: int, device) -> float:
    """Mean response-token NLL over a dataset (all ranks' shares combined)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    # by length, so that a batch holds little padding (the sum does not depend on the order)
    mine = dist.shard(evalset.lengths.argsort(stable=True).tolist())
    with dist.full_params(model):  # ranks may run different numbers of batches
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(device) for k, v in evalset.batch(mine[i:i + batch_size]).items()}
            s, n = token_losses(model, batch)
            total += torch.stack([s.double().cpu(), n.double().cpu()])
    total = dist.all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


class SFTStage(common.Training):
    """SFT for the stage loop (loop.py): a step is one optimizer step on a global batch."""

    name, command, unit = "sft", "sft", "step"

    def __init__(self, cfg: SFTConfig, model, train: PaddedSet, evalset: PaddedSet | None, device,
                 total_steps: int):
        super().__init__(model, cfg.optim, cfg.run, device, total_steps)
        self.cfg, self.train, self.evalset, self.device = cfg, train, evalset, device
        self.loss_tokens = train.tensors["loss_mask"][:, 1:].sum(1)  # (N,) per example
        self.dtype = common.compute_dtype(cfg.run, device, cfg.model.path)

    def step(self, ctx) -> StepResult:
        cfg = self.cfg
        self.model.train()
        global_idx = common.bucketed_batch(self.train.lengths, cfg.batch_size, cfg.run.seed, ctx.step - 1,
                                           cfg.bucket_batches)
        n_tokens = max(1, int(self.loss_tokens[global_idx].sum()))
        loss_sum = torch.zeros((), device=self.device)
        for micro in common.micro_batches(dist.shard(global_idx), cfg.grad_accum):
            batch = {k: v.to(self.device) for k, v in self.train.batch(micro).items()}
            with common.autocast(self.device, self.dtype):
                s, _ = token_losses(self.ddp_model, batch)
            # DDP averages gradients over ranks, hence the world-size factor.
            (s * dist.world_size() / n_tokens).backward()
            loss_sum += s.detach()
        loss = dist.all_reduce_sum(loss_sum) / n_tokens
        _, gnorm = self.optimizer_step(ctx, loss)
        return StepResult({"sft/train_loss": loss, "sft/grad_norm": gnorm, "sft/lr": self.sched.get_last_lr()[0],
                           "sft/skipped_steps": ctx.guard.skipped_total},
                          progress={"loss": f"{loss.item():.3f}"})

    def evaluate(self, step: int) -> StepResult:
        if self.evalset is None:
            return StepResult({})
        el = eval_loss(self.model, self.evalset, self.cfg.batch_size, self.device)
        return StepResult({"sft/eval_loss": el, "sft/eval_ppl": math.exp(min(el, 50))})


def run_sft(cfg: SFTConfig, resume: bool = False) -> dict:
    out_dir = Path(common.require(cfg.out_dir, "out_dir", "where to write the SFT model"))
    common.require_file(cfg.train_file, "train_file", "make one with `ppo-rlhf data --task arithmetic --out DIR`")
    common.check_batch(cfg.batch_size, cfg.grad_accum, "batch_size")
    device = common.setup(cfg.run, "sft", model=cfg.model.path)
    t_start = time.time()

    tokenizer = load_tokenizer(common.tokenizer_source(cfg.model))
    examples, read_report = read_sft(cfg.train_file)
    train, trunc = encode_sft(tokenizer, examples, cfg.max_prompt_len, cfg.max_len)
    evalset = []
    if cfg.eval_file:
        eval_examples, _ = read_sft(cfg.eval_file)
        evalset, _ = encode_sft(tokenizer, eval_examples, cfg.max_prompt_len, cfg.max_len)

    model = load_causal_lm(cfg.model.path, tokenizer, seed=cfg.run.seed).to(device)
    check_token_ids(train, model.config.vocab_size, cfg.train_file)  # every record: a max id each
    check_token_ids(evalset, model.config.vocab_size, cfg.eval_file)
    if cfg.model.lora_r:
        model = apply_lora(model, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout)
    steps = common.total_steps(len(train), cfg.batch_size, cfg.epochs, cfg.max_steps)
    pad = tokenizer.pad_token_id
    stage = SFTStage(cfg, model, padded_sft(train, pad), padded_sft(evalset, pad) if evalset else None,
                     device, steps)
    loop = StageLoop(stage, out_dir, cfg.run)
    if (done := loop.begin(resume)) is not None:  # --resume found the run finished
        return done
    if not loop.step and dist.is_main():
        loop.logger.log(0, {"data/examples": len(train), "data/truncated_prompts": trunc.prompts_truncated,
                            "data/truncated_responses": trunc.responses_truncated,
                            "data/dropped": trunc.dropped}, stage="sft")
    if dist.is_main() and (trunc.prompts_truncated or trunc.responses_truncated or trunc.dropped):
        print(f"[sft] {cfg.train_file}: {trunc.describe()}")
    if not loop.run():
        return {"stopped_at": loop.step}

    summary = {"stage": "sft", "steps": steps, "train_examples": len(train),
               "truncation": trunc.describe(), "duplicates": read_report.duplicates,
               "final_train_loss": float(loop.last.metrics["sft/train_loss"]) if loop.last else None,
               "skipped_steps": loop.guard.skipped_total}
    final = loop.evaluate()
    if final:
        summary.update(eval_loss=final["sft/eval_loss"], eval_ppl=final["sft/eval_ppl"])
    if cfg.task and cfg.eval_prompts_file:
        prompts = load_eval_prompts(cfg.eval_prompts_file, tokenizer, cfg.max_prompt_len)
        gold = {}
        with dist.full_params(model):
            for kind, temperature in (("", cfg.eval_temperature), ("_greedy", 0.0)):
                res = evaluate_policy(model, tokenizer, prompts, task=cfg.task, device=device,
                                      max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                                      seed=cfg.run.seed)
                gold[f"gold_reward{kind}"], gold[f"gold_reward{kind}_std"] = res["gold_reward"], res["gold_reward_std"]
        summary.update(gold)
        loop.logger.log(steps, {"sft/gold_reward": gold["gold_reward"],
                                "sft/gold_reward_greedy": gold["gold_reward_greedy"]}, stage="sft")
    exported = dist.plain_copy(model)  # on every rank: FSDP gathers the shards to rank 0
    if dist.is_main():
        save_model(exported, tokenizer, out_dir / "model")  # merges a copy of a LoRA model
        summary.update(seconds=time.time() - t_start, config=to_dict(cfg))
        write_summary(out_dir, summary)
    loop.close()
    return summary
