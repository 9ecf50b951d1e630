"""Our DPO, IPO and SimPO losses against TRL's on identical inputs, to 1e-6.

    PYTHONPATH=src python benchmarks/dpo_vs_trl_loss.py            # needs `pip install trl==1.12.0 --no-deps`

TRL is not a dependency of ppo-rlhf; without it this script says so and exits 0 after checking
our losses against TRL 1.12.0's published formulas, written out below (`published`).

With TRL, both sides start from the same logits (a stand-in model returns fixed random logits):
- DPO and IPO: TRL's `DPOTrainer._compute_loss` (loss_type "sigmoid" / "ipo", precomputed
  reference log-probs) -- its own log-prob extraction, masking, IPO length normalisation, mean
  over the batch and logged implicit rewards -- against `PREFERENCE_LOSSES[...]` on the float64
  log-probs of the same logits (the stage's `sequence_logprobs` computes them in float32: its
  difference from float64, ~1e-6 on sums of ~10 tokens, is reported beside);
- SimPO: TRL's `CPOTrainer.cpo_loss` (loss_type "simpo", experimental in TRL 1.12) on the
  per-token mean log-probs (what its forward passes it), against our `simpo` on the sums and
  lengths, with and without label smoothing.
The trainers' methods are called on a small stand-in for the trainer object (the attributes the
methods read), since building a real trainer needs a dataset and a model directory.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import sys
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ppo_rlhf.algo.preference import PREFERENCE_LOSSES, PreferenceBatch, PreferenceParams
from ppo_rlhf.stages.dpo import sequence_logprobs

TOL = 1e-6


def fixture(seed: int = 0, pairs: int = 6, length: int = 12, vocab: int = 50):
    """Random logits (2B, T, V) and a batch: rows [0, B) chosen, [B, 2B) rejected, prompts of 3-5
    tokens, responses of 1..T-5 tokens, right padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, length, vocab, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(vocab, (2 * pairs, length), generator=g)
    prompt = torch.randint(3, 6, (pairs,), generator=g).repeat(2)
    total = prompt + torch.randint(1, length - 5, (2 * pairs,), generator=g)
    pos = torch.arange(length)[None]
    attention = pos < total[:, None]
    completion = (pos >= prompt[:, None]) & attention
    ref = -torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 20
    return logits, {"input_ids": ids, "attention_mask": attention, "completion_mask": completion.long(),
                    "loss_mask": completion}, ref


class FixedLogits(torch.nn.Module):
    """Any forward returns the same logits (what a model computed)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.training = True

    def forward(self, **_):
        return SimpleNamespace(logits=self.logits)


def float64_logprobs(logits, batch):
    """(2B,) summed log-probs of the response tokens and (2B,) their count, in float64."""
    token_lp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    weights = batch["loss_mask"][:, 1:]
    return torch.where(weights, token_lp, 0.0).sum(1), weights.sum(1)


def ours(name: str, logits, batch, ref, params: PreferenceParams):
    """Our loss on the float64 log-probs of `logits` (the identical inputs TRL computes from them)."""
    logps, lengths = float64_logprobs(logits, batch)
    b = len(logps) // 2
    inputs = PreferenceBatch(logps[:b], logps[b:], lengths[:b].double(), lengths[b:].double(), ref[:b], ref[b:])
    return PREFERENCE_LOSSES[name].fn(inputs, params), logps, lengths


def trl_dpo(loss_type: str, logits, batch, ref, beta: float):
    """TRL 1.12.0's DPOTrainer._compute_loss on a stand-in trainer: (mean loss, metrics)."""
    from trl import DPOTrainer

    accel = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                            unwrap_model=lambda m: m)
    fake = SimpleNamespace(model=FixedLogits(logits), accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0)
    b = batch["input_ids"].size(0) // 2
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].long(),
              "completion_mask": batch["completion_mask"], "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
    loss = DPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


def trl_simpo(avg_chosen, avg_rejected, beta: float, gamma: float, smoothing: float):
    """TRL 1.12.0's CPOTrainer.cpo_loss (loss_type simpo) on per-token mean log-probs."""
    from trl.experimental.cpo import CPOTrainer

    fake = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=smoothing, loss_type="simpo",
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(fake, avg_chosen, avg_rejected)


def published(name: str, logps, lengths, ref, p: PreferenceParams) -> torch.Tensor:
    """TRL 1.12.0's per-pair formulas (dpo_trainer.py `_compute_loss`, cpo_trainer.py `cpo_loss`)."""
    b = len(logps) // 2
    cl, rl = logps[:b] - ref[:b], logps[b:] - ref[b:]
    if name == "dpo":
        return -F.logsigmoid(p.beta * (cl - rl))
    if name == "ipo":
        return (cl / lengths[:b] - rl / lengths[b:] - 1 / (2 * p.beta)) ** 2
    z = (logps[:b] / lengths[:b] - logps[b:] / lengths[b:]) - p.gamma / p.beta
    return -F.logsigmoid(p.beta * z) * (1 - p.label_smoothing) - F.logsigmoid(-p.beta * z) * p.label_smoothing


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `datasets`, `pyarrow`, `pandas` and their submodules as empty packages whose every public
    name is a placeholder class."""

    NAMES = ("datasets", "pyarrow", "pandas")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.NAMES:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {})

        module.__getattr__ = placeholder
        return module

    def exec_module(self, module):
        pass


def stand_in_datasets() -> bool:
    """TRL's trainer modules import `datasets`, `pyarrow` and `pandas` at the top, though the loss
    methods never touch it: where it is not installed, stand-ins are registered (`_StandIn`).
    Returns whether they were needed."""
    if all(importlib.util.find_spec(n) is not None for n in _StandIn.NAMES):
        return False
    sys.meta_path.append(_StandIn())
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dpo_vs_trl_loss.json"))
    args = ap.parse_args()
    try:
        import trl
        have_trl = True
        version = trl.__version__
        stand_in = stand_in_datasets()
    except ImportError:
        have_trl, version, stand_in = False, None, False
        print("[dpo_vs_trl_loss] trl is not importable: checking against TRL 1.12.0's published formulas only "
              "(pip install trl==1.12.0 --no-deps for the real check)")
    rows, worst = [], 0.0
    cases = [("dpo", PreferenceParams(beta=0.1)), ("dpo", PreferenceParams(beta=0.5)),
             ("ipo", PreferenceParams(beta=0.1)), ("ipo", PreferenceParams(beta=1.0)),
             ("simpo", PreferenceParams(beta=2.0, gamma=0.5)),
             ("simpo", PreferenceParams(beta=2.5, gamma=1.0, label_smoothing=0.1))]
    for seed in range(3):
        logits, batch, ref = fixture(seed)
        for name, p in cases:
            out, logps, lengths = ours(name, logits, batch, ref, p)
            b = len(logps) // 2
            row = {"loss": name, "seed": seed, **p._asdict(), "ours_mean": out.losses.mean().item()}
            diffs = {"published": (out.losses - published(name, logps, lengths.double(), ref, p)).abs().max().item()}
            if have_trl and name in ("dpo", "ipo"):
                trl_loss, m = trl_dpo("sigmoid" if name == "dpo" else "ipo", logits, batch, ref, p.beta)
                row["trl_mean"] = trl_loss
                diffs["trl_loss"] = abs(trl_loss - out.losses.mean().item())
                diffs["trl_rewards_chosen"] = abs(m["rewards/chosen"] - out.chosen_rewards.mean().item())
                diffs["trl_rewards_rejected"] = abs(m["rewards/rejected"] - out.rejected_rewards.mean().item())
                margin = (out.chosen_rewards - out.rejected_rewards).mean().item()
                diffs["trl_margin"] = abs(m["rewards/margins"] - margin)
            if have_trl and name == "simpo":
                avg = logps / lengths
                losses, rc, rr = trl_simpo(avg[:b], avg[b:], p.beta, p.gamma, p.label_smoothing)
                row["trl_mean"] = losses.mean().item()
                diffs["trl_losses"] = (losses - out.losses).abs().max().item()
                diffs["trl_rewards"] = max((rc - out.chosen_rewards).abs().max().item(),
                                           (rr - out.rejected_rewards).abs().max().item())
            row["max_abs_diff"] = diffs
            # for information: the stage's float32 log-probs against the float64 ones
            ours32, _ = sequence_logprobs(FixedLogits(logits), batch)
            row["sequence_logprobs_float32_abs_diff"] = (ours32.double() - logps).abs().max().item()
            worst = max(worst, *diffs.values())
            rows.append(row)
            print(f"{name:6s} seed {seed} beta {p.beta:<4} ours {row['ours_mean']:.8f} "
                  f"trl {row.get('trl_mean', float('nan')):.8f} max|diff| {max(diffs.values()):.2e}")
    ok = worst <= TOL and all(math.isfinite(r["ours_mean"]) for r in rows)
    result = {"trl_version": version, "checked_against": "trl" if have_trl else "published formulas",
              "datasets_stand_in": stand_in,
              "tolerance": TOL, "worst_abs_diff": worst, "ok": ok, "cases": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"[dpo_vs_trl_loss] {'OK' if ok else 'MISMATCH'}: worst |ours - {result['checked_against']}| = "
          f"{worst:.2e} (tolerance {TOL}) -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
