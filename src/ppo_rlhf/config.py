"""Typed configuration: one dataclass per stage, every field documented.

A config is built from (1) the dataclass defaults, (2) an optional YAML file, (3) dotted overrides
from the command line (`train.lr=3e-4`), in that order. Every value is type-checked and
range-checked before any work starts; an unknown key gets a did-you-mean. `describe(cls)` renders
the options with their docs for `--help` and for docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .algo.advantages import ADVANTAGES
from .algo.losses import AGGREGATIONS, POLICY_LOSSES
from .algo.off_policy import IS_CORRECTIONS
from .algo.options import opt
from .algo.preference import PREFERENCE_LOSSES
from .errors import UserError

ADVANTAGE_NAMES = tuple(ADVANTAGES)
POLICY_LOSS_NAMES = tuple(POLICY_LOSSES)
AGGREGATION_NAMES = tuple(AGGREGATIONS)
PREFERENCE_LOSS_NAMES = tuple(PREFERENCE_LOSSES)
PRESET_DIR = Path(__file__).parent / "algo" / "presets"


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
RL_LR = 3e-5
"""The RL stage's default learning rate (PPOConfig.optim.lr), also online DPO's (`online.lr: null`)."""


@dataclass
class LoRAConfig:
    """How to adapt a model: LoRA adapters or all weights. The RL stage's `model.*` holds only these:
    its policy is `policy=DIR`, with the tokenizer saved there."""

    lora_r: int = opt(0, "LoRA rank; 0 trains all weights.", min=0)
    lora_alpha: float = opt(16.0, "LoRA scaling alpha.", min=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch. Stage outputs are saved with the "
                              "adapters merged into the weights (plain transformers models).", min=0, max=1)


@dataclass
class ModelConfig(LoRAConfig):
    """Which saved model to start from, and how to adapt it (the reward stage: the SFT model)."""

    path: str = opt("tiny-gpt2", "Preset name (tiny-gpt2: gpt2 2 layers d=128 4 heads; tiny-llama: llama "
                    "2 x 128 x 4; small-gpt2: gpt2 4 x 256 x 4; qwen-0.5b-like: qwen2 24 x 896 x 14), a "
                    "size spec like gpt2:layers=4,hidden=128,heads=4, or a local Hugging Face model "
                    "directory. Stages after SFT default to the previous stage's output.")
    tokenizer: str = opt("", "Tokenizer directory; empty = the tokenizer saved in the model directory.")


@dataclass
class SFTModelConfig(ModelConfig):
    """Which model to start from or build from scratch, and how to adapt it."""

    arch: str | None = opt(None, "Build a model from scratch with this architecture (with model.layers, "
                           "model.hidden, model.heads; vocabulary size and special ids from the "
                           "tokenizer); null = as model.path.", choices=("gpt2", "llama", "qwen2"))
    layers: int | None = opt(None, "Transformer blocks of a model built from scratch; null = the "
                             "preset's (tiny: 2).", min=1)
    hidden: int | None = opt(None, "Hidden size of a model built from scratch; null = the preset's "
                             "(tiny: 128).", min=1)
    heads: int | None = opt(None, "Attention heads of a model built from scratch (must divide "
                            "model.hidden); null = the preset's (tiny: 4).", min=1)


@dataclass
class OptimConfig:
    """Optimiser and schedule."""

    lr: float = opt(1e-3, "Peak learning rate (AdamW).", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0, max=1)
    adam_beta2: float = opt(0.95, "AdamW beta2.", min=0, max=1)
    adam_eps: float = opt(1e-8, "AdamW epsilon.", min=0)
    schedule: str = opt("cosine", "Learning-rate schedule after warm-up.",
                        choices=("cosine", "linear", "constant"))
    warmup_steps: int = opt(10, "Linear warm-up steps (optimizer steps).", min=0)
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of the peak (cosine/linear).",
                              min=0, max=1)
    max_grad_norm: float = opt(1.0, "Gradient-norm clipping threshold; 0 disables clipping.", min=0)


@dataclass
class RunConfig:
    """Bookkeeping common to every training stage."""

    seed: int = opt(0, "Random seed (python, numpy, torch).")
    log_every: int = opt(1, "Log metrics every N optimizer steps.", min=1)
    eval_every: int = opt(50, "Evaluate every N optimizer steps (0 = only at the end).", min=0)
    save_every: int = opt(100, "Save a checkpoint every N optimizer steps (0 = only at the end).", min=0)
    keep_last: int = opt(2, "How many checkpoints to keep.", min=1)
    tensorboard: bool = opt(True, "Write TensorBoard event files (out_dir/tb).")
    wandb_project: str = opt("", "Weights & Biases project to log to (needs `pip install wandb`); empty = off.")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default.", min=0)
    device: str = opt("auto", "Device: auto, cpu, cuda, cuda:N.")
    dtype: str = opt("auto", "Compute precision: auto = bfloat16 where it was measured faster: on CUDA "
                     "devices that support it, and on CPUs with native bf16 products by model width "
                     "and stage (AMX: SFT, reward model and DPO from hidden size 128, the RL stage "
                     "from 256; AVX512-BF16 without AMX: from 256); else float32 (each stage prints "
                     "its choice and why). float32; bfloat16 = bf16 autocast (CPU or CUDA) with "
                     "float32 weights, optimizer state, log-softmax and losses.",
                     choices=("auto", "float32", "bfloat16"))
    onednn: bool = opt(True, "Run float32 CPU linear layers through oneDNN where the product is "
                       "large enough to gain (about 2x on AMD CPUs with AVX-512, which MKL's path "
                       "does not use; never on CPUs without AVX-512, where it is slower); "
                       "false = torch's default matmul everywhere.")
    max_nonfinite: int = opt(5, "Stop after this many consecutive non-finite losses/gradients.", min=1)
    fsdp: bool = opt(False, "Under torchrun, shard the models with FSDP2 (fully_shard per transformer "
                     "block) instead of replicating them with DDP; with dtype=bfloat16 on CUDA, bf16 "
                     "compute and fp32 gradient reduction. Not with LoRA.")
    activation_checkpointing: bool = opt(False, "Recompute each transformer block's activations in "
                                         "backward instead of storing them (less memory, ~1/3 more compute).")


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig:
    """`ppo-rlhf tokenizer`: train a byte-level BPE on a task's text or your own."""

    out_dir: str = opt("", "Directory to write the tokenizer to (required).")
    task: str = opt("", "Built-in task whose text to train on (arithmetic, sentiment).")
    texts: str = opt("", "JSONL file(s) of {\"text\"} (or SFT/preference records), comma-separated, "
                     "instead of a task.")
    vocab_size: int | None = opt(None, "Vocabulary size including special tokens; null = the task's "
                                 "default (512 for arithmetic, 768 for sentiment; 512 for your own text).",
                                 min=1)
    seed: int = opt(0, "Seed for the task's text generator.")


@dataclass
class DataConfig:
    """`ppo-rlhf data`: write a built-in task's JSONL files."""

    out_dir: str = opt("", "Directory to write the JSONL files to (required).")
    task: str = opt("arithmetic", "Built-in task (arithmetic, sentiment).")
    seed: int = opt(0, "Seed of the generators and the simulated labeller.")
    n_sft: int = opt(4000, "SFT demonstrations (train).", min=1)
    n_prefs: int = opt(4000, "Preference pairs (train).", min=1)
    n_prompts: int = opt(2000, "PPO training prompts.", min=1)
    n_eval: int = opt(400, "Held-out examples of each kind.", min=1)
    noise_temperature: float | None = opt(None, "Bradley-Terry label-noise temperature of the "
                                          "simulated labeller (0 = exact gold labels; null = the "
                                          "task's default).", min=0)
    holdout: str = opt("ppo", "What the eval prompts are held out from: 'ppo' = the PPO prompts "
                       "(SFT and preference data cover the whole prompt space, as in InstructGPT); "
                       "'problems' = every training file (a generalisation test).",
                       choices=("ppo", "problems"))


@dataclass
class SFTConfig:
    """`ppo-rlhf sft`: supervised fine-tuning on prompt/response demonstrations (loss on response tokens)."""

    out_dir: str = opt("", "Output directory (model, tokenizer, metrics, checkpoints).")
    train_file: str = opt("", "SFT JSONL: {\"prompt\", \"response\"} or {\"messages\"}.")
    eval_file: str = opt("", "Held-out SFT JSONL for eval loss/perplexity (optional).")
    task: str = opt("", "Built-in task for the gold reward at the end, of greedy and of sampled "
                    "(eval_temperature) responses (optional).")
    eval_prompts_file: str = opt("", "Prompts JSONL for the gold-reward evaluation (needs task).")
    eval_temperature: float = opt(0.7, "Sampling temperature of the sampled gold-reward evaluation "
                                  "(the RL stage's default, 0.7); the greedy one is reported beside it.",
                                  min=0)
    max_prompt_len: int = opt(64, "Prompt tokens kept (truncated from the left).", min=1)
    max_len: int = opt(128, "Prompt + response tokens kept (truncated from the right).", min=2)
    max_new_tokens: int | None = opt(None, "Tokens sampled in the gold-reward evaluation; null = the "
                                     "task's default.", min=1)
    batch_size: int = opt(32, "Sequences per optimizer step (across all ranks). 64 at lr 2e-3 matched 32 at 1e-3 "
                          "on arithmetic (4,000 examples) in 1.35x less time but lost 6-12 points of gold on "
                          "the 2,000 examples of examples/reverse (benchmarks/TIME_TO_QUALITY.md).", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step (batch_size must divide evenly).", min=1)
    bucket_batches: int = opt(1, "Length bucketing: the examples of this many consecutive batches are "
                              "sorted by length and cut into batches again (less padding, e.g. 8: about "
                              "1.2x faster steps on arithmetic; each epoch still sees every example "
                              "once, but batches of similar lengths change what a step sees); 1 = off.", min=1)
    epochs: float = opt(20.0, "Passes over the training data (fractions allowed).", min=0)
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = from epochs).", min=0)
    model: SFTModelConfig = opt(factory=SFTModelConfig, help="Model to fine-tune.")
    optim: OptimConfig = opt(factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50), help="Optimiser.")
    run: RunConfig = opt(factory=RunConfig, help="Run bookkeeping.")


@dataclass
class RewardConfig:
    """`ppo-rlhf reward`: reward model from preference pairs with the Bradley-Terry loss."""

    out_dir: str = opt("", "Output directory.")
    train_file: str = opt("", "Preference JSONL: {\"prompt\",\"chosen\",\"rejected\"} or rankings "
                          "{\"prompt\",\"responses\"}.")
    eval_file: str = opt("", "Held-out preference JSONL for pairwise accuracy.")
    norm_prompts_file: str = opt("", "Prompts whose SFT-policy responses define the reward "
                                 "normalisation (mean 0, std 1); empty = use the training pairs' responses.")
    norm_policy: str = opt("", "Policy (SFT) directory that samples the normalisation responses; "
                           "empty = model.path.")
    norm_samples: int = opt(256, "How many responses to sample for the normalisation.", min=2)
    norm_temperature: float = opt(0.7, "Sampling temperature of the normalisation responses: the RL "
                                  "stage's (rollout.temperature, which the pipeline passes), so that "
                                  "the policy's own rollouts score mean 0, std 1.", min=0)
    max_new_tokens: int = opt(16, "Tokens sampled per normalisation response.", min=1)
    max_prompt_len: int = opt(64, "Prompt tokens kept (truncated from the left).", min=1)
    max_len: int = opt(128, "Prompt + response tokens kept.", min=2)
    batch_size: int = opt(32, "Pairs per optimizer step (across all ranks).", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", min=1)
    bucket_batches: int = opt(1, "Length bucketing: the pairs of this many consecutive batches are "
                              "sorted by length and cut into batches again (less padding, e.g. 8: about "
                              "1.2x faster steps on arithmetic; each epoch still sees every pair "
                              "once, but batches of similar lengths change what a step sees); 1 = off.", min=1)
    epochs: float = opt(3.0, "Passes over the training pairs.", min=0)
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = from epochs).", min=0)
    margin: float = opt(0.0, "Margin in -log sigmoid(r_chosen - r_rejected - margin).")
    head_init_std: float = opt(0.0, "Std of the scalar head's initial weights (0 = zero init).", min=0)
    model: ModelConfig = opt(factory=lambda: ModelConfig(path=""),
                             help="Trunk to start from: model.path is the SFT model directory (required; "
                             "InstructGPT initialises the reward model from the SFT model).",
                             unknown="the reward model's trunk is the SFT model at model.path, of that "
                             "model's size; model.* holds only path, tokenizer and the LoRA options")
    optim: OptimConfig = opt(factory=lambda: OptimConfig(lr=5e-4), help="Optimiser.")
    run: RunConfig = opt(factory=RunConfig, help="Run bookkeeping.")


@dataclass
class RolloutConfig:
    """How responses are sampled, and what happens to responses cut off without EOS."""

    batch_size: int = opt(64, "Prompts per rollout (across all ranks); each gets algo.samples_per_prompt "
                          "responses.", min=1)
    max_new_tokens: int | None = opt(None, "Maximum response tokens; null = the task's default (or 32).", min=1)
    temperature: float = opt(0.7, "Sampling temperature (log-probs use the same temperature).", min=1e-3)
    top_k: int = opt(0, "Top-k sampling (0 = off); the stored and trained log-probs are those of the "
                     "truncated distribution actually sampled.", min=0)
    top_p: float = opt(1.0, "Nucleus sampling threshold (1 = off); as top_k for the log-probs.", min=0, max=1)
    truncated: str = opt("penalty", "Responses that hit max_new_tokens without EOS: 'penalty' = their "
                         "score is replaced by missing_eos_penalty; 'keep' = scored as any other; "
                         "'mask' = left out of the policy loss (DAPO's overlong filtering).",
                         choices=("penalty", "keep", "mask"))
    missing_eos_penalty: float = opt(-1.0, "Score of a truncated response when truncated=penalty.")
    overlong_buffer: int | None = opt(None, "DAPO's soft overlong punishment: responses longer than "
                                      "max_new_tokens - overlong_buffer lose up to overlong_penalty, "
                                      "linearly in the excess; null = off.", min=1)
    overlong_penalty: float = opt(1.0, "Largest soft overlong punishment (at max_new_tokens).", min=0)


@dataclass
class RewardShapingConfig:
    """Turning reward-model scores, reward functions and KL into per-token rewards."""

    functions: str = opt("", "Reward functions, comma-separated: `pkg.module:fn` or `path/to/file.py:fn`, "
                         "each called as fn(prompts, responses, **row_fields) -> list of floats (or, "
                         "per row, a list of (character offset, reward) steps: a process reward). "
                         "Without reward_model they are the whole reward.")
    weights: str = opt("", "Weights of the reward functions, comma-separated (empty = 1 each).")
    rm_weight: float = opt(1.0, "Weight of the reward model's score when it is combined with functions.")
    combine: str = opt("sum", "How the reward-model score and the functions combine: 'sum' (weighted "
                       "sum), 'sum_then_normalize' (weighted sum, standardised over the batch) or "
                       "'normalize_then_sum' (each standardised over the batch, then summed).",
                       choices=("sum", "sum_then_normalize", "normalize_then_sum"))
    kl_estimator: str = opt("k1", "Per-token KL estimator (in the reward or in the loss, see algo.kl_in).",
                            choices=("k1", "k2", "k3"))
    kl_control: str = opt("fixed", "KL coefficient controller.", choices=("fixed", "adaptive"))
    kl_coef: float = opt(0.5, "KL coefficient beta (initial value when adaptive). 0.5 suits the tiny "
                         "built-in tasks (lower let PPO over-optimise the RM); InstructGPT used 0.02, TRL 0.05.",
                         min=0)
    kl_target: float = opt(6.0, "Adaptive controller's target KL (nats per sequence).", min=1e-6)
    kl_horizon: int = opt(10000, "Adaptive controller's horizon (samples).", min=1)
    score_clip: float | None = opt(10.0, "Clip the (normalised) score to +-this; null = no clipping.", min=0)
    normalize: bool | None = opt(None, "Running mean/std normalisation of the sequence scores during RL. null "
                                 "(auto) = on when reward functions are the whole reward (no reward_model): a "
                                 "function's scale is its author's choice, and it would set how strongly the KL "
                                 "coefficient binds; a reward model's scores are standardised by its own stage.")
    credit: str = opt("sparse", "Credit assignment: 'sparse' = score at the last token; 'dense' = "
                      "per-token RM score differences (potential-based shaping) plus the sparse score.",
                      choices=("sparse", "dense"))
    dense_coef: float = opt(0.5, "Weight of the dense per-token credit when credit=dense.", min=0)


@dataclass
class _PPOLossOptions:
    """Loss terms and the advantage estimators' knobs."""

    clip_eps: float = opt(0.2, "Policy ratio clip epsilon (the lower one, 1 - clip_eps).", min=0)
    clip_eps_high: float | None = opt(None, "Upper clip epsilon, 1 + clip_eps_high (DAPO's clip-higher); "
                                      "null = clip_eps.", min=0)
    dual_clip_c: float = opt(3.0, "Dual-clip bound c: with policy_loss=dual_clip a negative-advantage "
                             "token's loss is at most -c * A.", min=1)
    value_clip_eps: float | None = opt(0.2, "Value clip epsilon; null = unclipped value loss.", min=0)
    vf_coef: float = opt(0.1, "Value-loss coefficient c1. It matters only when the value loss shares "
                         "parameters with the policy (train.value_model=policy_head): a separate value "
                         "model has its own AdamW, which normalises any constant factor away -- use "
                         "train.value_lr to make its updates larger or smaller.", min=0)
    entropy_coef: float = opt(0.0, "Entropy bonus coefficient.", min=0)
    ptx_coef: float = opt(0.0, "PPO-ptx coefficient c2 on pretraining text (InstructGPT: 27.8 with beta 0.02).",
                          min=0)
    ptx_batch_size: int = opt(16, "Pretraining sequences per minibatch when ptx_coef > 0.", min=1)
    gamma: float = opt(1.0, "Discount gamma (GAE and returns-to-go).", min=0, max=1)
    lam: float = opt(0.95, "GAE lambda of the policy's advantages.", min=0, max=1)
    critic_lam: float | None = opt(None, "GAE lambda of the value model's returns (VC-PPO/VAPO use 1.0); "
                                   "null = lam.", min=0, max=1)
    adaptive_lam_alpha: float | None = opt(None, "VAPO's length-adaptive lambda: each response's policy "
                                           "lambda is 1 - 1/(alpha * length) (VAPO: alpha 0.05); null = off.",
                                           min=1e-6)
    norm_by_std: bool = opt(True, "GRPO: divide the group-centred scores by the group's std "
                            "(false = Dr. GRPO's unscaled advantages).")
    whiten_advantages: bool = opt(True, "Whiten the advantages over the global rollout batch.")
    is_correction: str = opt("tis", "Importance-sampling correction of rows the proximal policy did not "
                             "sample (replayed rows, algo.replay_ratio): the loss's ratio is taken against "
                             "pi_prox (the policy at the start of the update) and each token weighed by "
                             "w = pi_prox / pi_behaviour: 'is' plain, 'tis' min(w, is_cap), 'mis' w inside "
                             "[1/is_cap, is_cap] else 0, 'seq_mask' 1 for rows whose geometric-mean w is in "
                             "that band else 0, 'none' 1. Exactly 1 on fresh rows.",
                             choices=tuple(IS_CORRECTIONS))
    is_cap: float = opt(2.0, "The cap C of loss.is_correction (tis, mis, seq_mask); > 1.", min=1.0 + 1e-6)


# A registered policy loss with knobs of its own (algo/losses.py, `register_policy_loss(knobs=...)`)
# gets a section loss.<name> (e.g. loss.cispo.weight_max): a new loss's options need no edit here.
PPOLossConfig = dataclasses.make_dataclass(
    "PPOLossConfig",
    [(name, loss.knobs, opt(factory=loss.knobs, help=f"Options of algo.policy_loss={name}: "
                                                      f"{(loss.knobs.__doc__ or '').strip()}"))
     for name, loss in POLICY_LOSSES.items() if loss.knobs is not None],
    bases=(_PPOLossOptions,))
PPOLossConfig.__doc__, PPOLossConfig.__module__ = _PPOLossOptions.__doc__, __name__


@dataclass
class TRPOConfig:
    """TRPO's natural-gradient step (policy_loss=trpo)."""

    max_kl: float = opt(0.01, "Trust region: mean per-token KL(old || new) a step may reach.", min=1e-8)
    cg_iters: int = opt(10, "Conjugate-gradient iterations per step.", min=1)
    fisher_fraction: float = opt(0.25, "Share of the rollout's rows the Fisher-vector products are "
                                 "estimated on (every k-th row; the gradient and the line search use "
                                 "all rows): conjugate gradient's cost.", min=1e-3, max=1)
    damping: float = opt(0.1, "Damping added to the Fisher matrix in conjugate gradient.", min=0)
    backtrack: float = opt(0.5, "Line-search step shrink factor.", min=0.01, max=0.99)
    line_search_steps: int = opt(10, "Line-search tries before the step is rejected.", min=1)


@dataclass
class AlgorithmConfig:
    """The RL algorithm as a declaration: `algo=NAME` loads a preset (src/ppo_rlhf/algo/presets/NAME.yaml)
    and every field can be overridden (`algo.advantage=rloo`)."""

    name: str = opt("ppo", "The preset this algorithm started from (set with algo=NAME; each preset's "
                    "settings and sources are in src/ppo_rlhf/algo/presets/NAME.yaml).",
                    choices=tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))))
    advantage: str = opt("gae", "Advantage estimator.", choices=ADVANTAGE_NAMES)
    policy_loss: str = opt("ppo_clip", "Policy loss.", choices=POLICY_LOSS_NAMES)
    aggregation: str = opt("token-mean", "How per-token policy losses become the minibatch loss.",
                           choices=AGGREGATION_NAMES)
    critic: bool = opt(True, "Train a value model (needed by the gae estimator).")
    samples_per_prompt: int = opt(1, "Responses sampled per prompt (a group; GRPO/RLOO need >= 2). The "
                                  "prompt's KV cache is computed once for its group.", min=1)
    kl_in: str = opt("reward", "Where the KL to the reference goes: 'reward' (-beta * KL_t in the "
                     "per-token reward, InstructGPT) or 'loss' (+beta * KL_t added to the policy loss, GRPO).",
                     choices=("reward", "loss"))
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: drop groups whose rewards are all equal "
                                 "(no signal) and sample more prompts to refill the batch.")
    max_sampling_rounds: int = opt(3, "Rollouts tried per update to refill the batch under dynamic sampling.",
                                   min=1)
    replay_ratio: float = opt(0.0, "Experience replay: each newly sampled row is used this many times in "
                              "gradient steps on average (replay_ratio * train.num_minibatches optimizer steps "
                              "per iteration, each on a minibatch of rollout rows / num_minibatches drawn "
                              "from the buffer, this iteration's rows included; IS-corrected by "
                              "loss.is_correction). 0 = on-policy: the rollout serves train.ppo_epochs passes "
                              "and is dropped.", min=0)
    replay_capacity: int | None = opt(None, "Rows the replay buffer keeps (whole groups; the oldest go first); "
                                      "null = 4 rollouts.", min=1)
    replay_staleness: int = opt(4, "Replayed rows at most this many policy versions (iterations) old.", min=0)
    trpo: TRPOConfig = opt(factory=TRPOConfig, help="TRPO's step.")


@dataclass
class PPOTrainConfig:
    """The update schedule."""

    updates: int = opt(150, "Rollout/update iterations.", min=1)
    ppo_epochs: int = opt(2, "Passes over each rollout's experience.", min=1)
    num_minibatches: int = opt(2, "Minibatches per epoch (optimizer steps per epoch).", min=1)
    grad_accum: int = opt(1, "Micro-batches per minibatch (gradient accumulation).", min=1)
    value_lr: float | None = opt(None, "Value model learning rate; null = optim.lr. The knob for how fast "
                                 "a separate value model learns.", min=0)
    critic_warmup_updates: int = opt(0, "First N iterations update only the value model.", min=0)
    value_update_every: int = opt(1, "Update the value model every N iterations.", min=1)
    target_kl: float | None = opt(None, "Stop an iteration's epochs early when approx_kl exceeds this; "
                                  "null = off.", min=0)
    value_model: str = opt("separate", "Value model: 'separate' (a copy of the RM, or of the policy "
                           "with a new head when there is no RM) or 'policy_head' (a head on the "
                           "policy's own trunk; one process, no LoRA).",
                           choices=("separate", "policy_head"))
    value_init: str = opt("", "Warm-start the value model from this directory: a saved value model "
                          "(RUN/ppo/value_model) or a critic pretraining's output; empty = the RM.")
    critic_pretrain_rollouts: int = opt(0, "Before RL: sample this many rollouts with the initial policy "
                                        "and fit the value model on them (critic-only pretraining).", min=0)
    critic_pretrain_epochs: int = opt(4, "Passes over the fixed pretraining rollouts.", min=1)


@dataclass
class PPOConfig:
    """`ppo-rlhf ppo` / `ppo-rlhf rl`: RL against the reward model and/or reward functions with a KL
    penalty to the SFT reference; the algorithm is `algo` (PPO by default)."""

    out_dir: str = opt("", "Output directory.")
    policy: str = opt("", "SFT model directory (policy init and frozen reference).")
    reward_model: str = opt("", "Reward model directory (frozen; also the value model's init). May be "
                            "empty when reward.functions are given.")
    prompts_file: str = opt("", "Training prompts JSONL {\"prompt\", ...}; other keys of a row are "
                            "passed to the reward functions.")
    eval_prompts_file: str = opt("", "Held-out prompts JSONL for periodic evaluation (optional).")
    ptx_file: str = opt("", "Pretraining text JSONL {\"text\"} for PPO-ptx (needed when loss.ptx_coef > 0).")
    task: str = opt("", "Task for the gold reward (metrics only; never used for training): a built-in "
                    "name or path/to/task.py:Class.")
    max_prompt_len: int = opt(64, "Prompt tokens kept (truncated from the left).", min=1)
    eval_samples: int = opt(400, "Held-out prompt samples per evaluation (a small file is cycled).", min=1)
    sample_rows: int = opt(4, "Prompt/response rows kept in samples.jsonl per evaluation.", min=0)
    algo: AlgorithmConfig = opt(factory=AlgorithmConfig, help="The RL algorithm.")
    model: LoRAConfig = opt(factory=LoRAConfig, help="LoRA options for the policy.",
                            unknown="the RL stage's policy is `policy=DIR` (with the tokenizer saved "
                            "there); model.* holds only the LoRA options")
    rollout: RolloutConfig = opt(factory=RolloutConfig, help="Sampling.")
    reward: RewardShapingConfig = opt(factory=RewardShapingConfig, help="Reward shaping.")
    loss: PPOLossConfig = opt(factory=PPOLossConfig, help="Losses.")
    train: PPOTrainConfig = opt(factory=PPOTrainConfig, help="Update schedule.")
    # 3e-5 (was 1e-4): arithmetic, RM, seeds 0-2, PPO at 1e-4 lowered greedy gold by 4-5 points
    # while raising sampled gold; at 3e-5 it raised both, at a lower KL (benchmarks/ALGORITHMS.md).
    optim: OptimConfig = opt(factory=lambda: OptimConfig(lr=RL_LR, warmup_steps=0, schedule="constant"),
                             help="Optimiser (policy and value).")
    run: RunConfig = opt(factory=lambda: RunConfig(eval_every=25, save_every=50), help="Run bookkeeping.")


@dataclass
class OnlineDPOConfig:
    """Online (iterative) DPO: each round samples two responses per prompt from the current
    policy, labels them with the reward model and/or reward functions (the better-scored one is
    chosen; ties are skipped and counted), then takes DPO steps on the new pairs."""

    enabled: bool = opt(False, "Learn from the policy's own labelled samples (prompts_file) instead of "
                        "the fixed pairs of train_file.")
    rounds: int = opt(40, "Sample-label-train rounds (the stage's steps when online). 40: from one SFT "
                      "model and RM each (seed 0), 20 / 40 / 60 rounds gained 8.0 / 13.0 / 15.8 points of "
                      "sampled gold on sentiment (KL 0.19 / 0.55 / 0.88) and 13.7 / 13.2 / 9.7 on "
                      "arithmetic (KL 0.21 / 0.47 / 0.71; greedy gold -0.5 / -3.0 / -9.2).", min=1)
    prompts_per_round: int = opt(64, "Prompts sampled per round (across all ranks), two responses each.",
                                 min=1)
    epochs: int = opt(1, "Passes over a round's new pairs (batch_size pairs per optimizer step).", min=1)
    temperature: float = opt(0.7, "Sampling temperature of the two responses (0.7, the RL stage's: on "
                             "arithmetic, seed 0, T = 1 pairs were 60% ties and over-optimised the RM).", min=1e-3)
    lr: float | None = opt(None, "Learning rate of the online rounds (replaces optim.lr); null = 3e-5, the RL "
                           "stage's (arithmetic, seeds 0 and 1: at 1e-4 online DPO gained 4.0 / 2.3 points of "
                           "gold and lost 20 of greedy gold; at 3e-5 +10.0 / +13.3, greedy within 3 points).",
                           min=0)
    max_new_tokens: int | None = opt(None, "Response tokens sampled; null = the task's default (or 32).",
                                     min=1)
    functions: str = opt("", "Reward functions that label the pairs, comma-separated (`pkg.module:fn` "
                         "or `path/to/file.py:fn`), with or instead of reward_model; their sum, and "
                         "the RM score, is the label score.")
    weights: str = opt("", "Weights of the reward functions, comma-separated (empty = 1 each).")
    truncated: str = opt("penalty", "Responses that hit max_new_tokens without EOS: 'penalty' = their label "
                         "score is missing_eos_penalty (two such responses tie); 'keep' = scored as any other.",
                         choices=("penalty", "keep"))
    missing_eos_penalty: float = opt(-1.0, "Label score of a truncated response when truncated=penalty "
                                     "(the RL stage's default).")


@dataclass
class DPOConfig:
    """`ppo-rlhf dpo`: direct preference optimisation of the SFT policy (DPO, IPO, SimPO, KTO or
    ORPO) on the preference pairs the reward stage reads, or online on its own labelled samples."""

    out_dir: str = opt("", "Output directory.")
    policy: str = opt("", "SFT model directory (policy init and frozen reference).")
    train_file: str = opt("", "Preference JSONL: {\"prompt\",\"chosen\",\"rejected\"} or rankings "
                          "{\"prompt\",\"responses\"} (all C(K,2) pairs); not read when online.")
    eval_file: str = opt("", "Held-out preference JSONL: implicit-reward margin and accuracy (optional).")
    prompts_file: str = opt("", "Prompts JSONL sampled by online DPO (online.enabled).")
    eval_prompts_file: str = opt("", "Held-out prompts for the gold reward, RM score and KL of greedy "
                                 "and sampled responses (optional).")
    reward_model: str = opt("", "Reward model directory: labels online pairs; scores the evaluation "
                            "responses (optional offline).")
    task: str = opt("", "Task for the gold reward (metrics only): a built-in name or path/to/task.py:Class.")
    loss: str = opt("dpo", "Preference loss (src/ppo_rlhf/algo/preference.py).", choices=PREFERENCE_LOSS_NAMES)
    beta: float | None = opt(None, "beta of the loss (IPO's tau, ORPO's lambda); null = the loss's "
                             "usual value (dpo, ipo, kto, orpo 0.1; simpo 2.0), and 0.5 online (on-policy "
                             "pairs labelled by a small RM over-optimise it at 0.1: benchmarks/PREFERENCE.md).",
                             min=1e-8)
    label_smoothing: float = opt(0.0, "dpo (cDPO) and simpo: probability that a label is flipped.",
                                 min=0, max=0.5)
    gamma: float = opt(0.5, "simpo: target reward margin.", min=0)
    desirable_weight: float = opt(1.0, "kto: weight lambda_D of the desirable (chosen) examples.", min=0)
    undesirable_weight: float = opt(1.0, "kto: weight lambda_U of the undesirable (rejected) examples.", min=0)
    precompute_ref: bool = opt(True, "Compute the reference log-probs of every training pair once before "
                               "training (false: in every step, one more forward per micro-batch).")
    max_prompt_len: int = opt(64, "Prompt tokens kept (truncated from the left).", min=1)
    max_len: int = opt(128, "Prompt + response tokens kept.", min=2)
    batch_size: int = opt(32, "Pairs per optimizer step (across all ranks).", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", min=1)
    bucket_batches: int = opt(1, "Length bucketing of the training pairs, as in the reward stage; 1 = off.",
                              min=1)
    epochs: float = opt(1.0, "Passes over the training pairs (offline).", min=0)
    max_steps: int = opt(0, "Stop after this many optimizer steps (offline; 0 = from epochs).", min=0)
    eval_samples: int = opt(400, "Held-out prompt samples per evaluation (a small file is cycled).", min=1)
    eval_temperature: float = opt(0.7, "Temperature of the sampled evaluation (the greedy one is "
                                  "reported beside it); also the temperature of its KL.", min=1e-3)
    sample_rows: int = opt(4, "Prompt/response rows kept in samples.jsonl per evaluation.", min=0)
    model: ModelConfig = opt(factory=lambda: ModelConfig(path=""),
                             help="LoRA options for the policy (path is ignored: see policy); with LoRA "
                             "the reference is the base model with the adapters disabled.")
    online: OnlineDPOConfig = opt(factory=OnlineDPOConfig, help="Online (iterative) DPO.")
    optim: OptimConfig = opt(factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"),
                             help="Optimiser.")
    run: RunConfig = opt(factory=lambda: RunConfig(eval_every=50, save_every=50), help="Run bookkeeping.")


@dataclass
class EvalConfig:
    """`ppo-rlhf eval`: gold reward, RM score and KL of a policy on held-out prompts."""

    policy: str = opt("", "Policy directory to evaluate.")
    reference: str = opt("", "Reference (SFT) directory for the KL (optional).")
    reward_model: str = opt("", "Reward model directory for the RM score (optional).")
    prompts_file: str = opt("", "Prompts JSONL.")
    task: str = opt("", "Task for the gold reward (optional): built-in (arithmetic, sentiment) or "
                    "your own, path/to/task.py:Class or module:Class (docs/tasks.md).")
    gold: str = opt("", "Gold reward function instead of a task: path/to/file.py:fn or module:fn, "
                    "called as fn(prompts, responses, **row_fields) -> list of floats.")
    out: str = opt("", "Write the results as JSON here (optional).")
    n: int = opt(400, "Samples to evaluate: the first n prompts; a file with fewer prompts is "
                 "cycled (each prompt sampled several times; the result reports "
                 "distinct_prompts and samples_per_prompt).", min=1)
    max_new_tokens: int | None = opt(None, "Response tokens; null = the task's default (or 32).", min=1)
    temperature: float = opt(0.7, "Sampling temperature of the sampled evaluation; the greedy gold "
                             "reward (gold_reward_greedy) is reported beside it. 0 = greedy only.", min=0)
    batch_size: int = opt(64, "Prompts per generation batch.", min=1)
    max_prompt_len: int = opt(64, "Prompt tokens kept.", min=1)
    seed: int = opt(1234, "Sampling seed.")


@dataclass
class PipelineConfig:
    """`ppo-rlhf pipeline`: tokenizer -> data -> sft -> reward -> ppo -> eval on a built-in task's
    generated data, or on your own JSONL files (`--data DIR`)."""

    task: str = opt("arithmetic", "Task: built-in (arithmetic, sentiment) or your own "
                    "(path/to/task.py:Class, docs/tasks.md); with data_dir, only the gold reward of "
                    "the evaluations (default there: none).")
    data_dir: str = opt("", "Your own data instead of a task's generated files: a directory holding "
                        "sft_train.jsonl, prefs_train.jsonl, prompts_train.jsonl (and optionally "
                        "sft_eval, prefs_eval, prompts_eval, pretrain .jsonl), or a YAML file mapping "
                        "those names to paths.")
    gold: str = opt("", "Gold reward function for the evaluations (path/to/file.py:fn or module:fn) "
                    "instead of a task.")
    eval_fraction: float = opt(0.1, "With data_dir and no prefs_eval/prompts_eval file: the share of "
                               "preference records / prompts split off (whole prompts) for evaluation.",
                               min=0.01, max=0.9)
    algo: str = opt("", "RL algorithm preset for the RL stage (sets ppo.algo=NAME, e.g. grpo); "
                    "empty = the RL stage's default (PPO).")
    out_dir: str = opt("runs/demo", "Run directory; each stage is skipped when its output exists.")
    seed: int = opt(0, "Seed of every stage.")
    model: str = opt("tiny-gpt2", "Model to start from: a preset, a size spec "
                     "(gpt2:layers=4,hidden=128,heads=4) or a local HF directory; sft.model.arch / "
                     "layers / hidden / heads set the size too.")
    tokenizer: TokenizerConfig = opt(factory=TokenizerConfig, help="Tokenizer stage.",
                                     sets={"out_dir": "out_dir/tokenizer"})
    data: DataConfig = opt(factory=DataConfig, help="Data stage.", sets={"out_dir": "out_dir/data"})
    sft: SFTConfig = opt(factory=SFTConfig, help="SFT stage.", sets={"out_dir": "out_dir/sft"})
    reward: RewardConfig = opt(factory=RewardConfig, help="Reward-model stage.",
                               sets={"out_dir": "out_dir/reward", "model.path": "sft.out_dir/model"})
    ppo: PPOConfig = opt(factory=PPOConfig, help="RL stage (the algorithm: algo or ppo.algo).",
                         sets={"out_dir": "out_dir/ppo"})
    dpo: DPOConfig = opt(factory=DPOConfig, help="DPO stage (the methods dpo, ipo, simpo, kto, orpo and "
                         "online_dpo of `compare`).")
    compare: str = opt("", "Methods to compare from the same SFT model and reward model, comma-separated: "
                       "ppo, online_dpo, the preference losses (dpo, ipo, simpo, kto, orpo) and the other RL "
                       "presets (grpo, rloo, ...: the preset, then your ppo.* settings); each runs "
                       "into RUN/<method>/ and RUN/compare.json holds their evaluations; empty = the "
                       "plain pipeline.")
    eval: EvalConfig = opt(factory=EvalConfig, help="Final evaluation.")


STAGE_CONFIGS: dict[str, type] = {
    "tokenizer": TokenizerConfig, "data": DataConfig, "sft": SFTConfig, "reward": RewardConfig,
    "ppo": PPOConfig, "rl": PPOConfig, "dpo": DPOConfig, "eval": EvalConfig, "pipeline": PipelineConfig,
}


# ----------------------------------------------------------------------------------------------
# Loading, overriding, validating
# ----------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class."""
    keys = []
    hints = _hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            keys.extend(all_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(cls: type, key: str, where: str, instead: str = "") -> UserError:
    keys = all_keys(cls)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not close:  # match on the last component too: `lr` -> `optim.lr`
        last = key.split(".")[-1]
        close = [k for k in keys if k.split(".")[-1] == last][:3]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if instead:  # a key that exists in another stage: say what this stage does instead
        hint = f" This stage does not use it: {instead}.{hint}"
    return UserError(f"{where}unknown config key '{key}'.{hint} "
                     f"(`ppo-rlhf <stage> --help` lists the options.)")


def optional_inner(typ: Any) -> Any:
    """`T` for a field typed `Optional[T]` / `T | None` (None = unset), else None."""
    if typing.get_origin(typ) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if len(args) != 1 or len(args) == len(typing.get_args(typ)):
        raise TypeError(f"config fields may be `T | None` of one type T, not {typ}")
    return args[0]


def _type_name(typ: Any) -> str:
    inner = optional_inner(typ)
    if inner is not None:
        return f"{inner.__name__} or null"
    return getattr(typ, "__name__", str(typ))


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type or raise a UserError naming the key.

    An `Optional[T]` field takes YAML `null` (also `~`, or `none`/`null` on the command line)
    as None = unset; anything else is coerced to T.
    """
    def bad(expected: str) -> UserError:
        return UserError(f"{where}{key}: expected {expected}, got {value!r}.")

    inner = optional_inner(typ)
    if inner is not None:
        # A string field keeps the text "none" as text: only a real YAML null unsets it.
        if value is None or (inner is not str and isinstance(value, str)
                             and value.strip().lower() in ("null", "none", "~")):
            return None
        try:
            return _coerce(value, inner, key, where)
        except UserError as e:  # "expected an integer, got 'x'." -> "expected an integer or null, ..."
            raise UserError(str(e).replace(", got ", " or null, got ", 1)) from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad("true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad("an integer") from None
                if f.is_integer():
                    return int(f)
        raise bad("an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise bad("a number") from None
        else:
            raise bad("a number")
        if not math.isfinite(out):
            raise bad("a finite number")
        return out
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value) if value is not None else ""
        if value is None:
            return ""
        raise bad("a string")
    raise bad(str(typ))


def _check_range(value: Any, f: dataclasses.Field, key: str, where: str, typ: Any = None) -> None:
    meta = f.metadata
    if value is None:  # an Optional field left unset: nothing to range-check
        return
    # Old configs wrote 0 / -1 for "unset" where the field is now Optional: say what to write.
    unset = "; null = unset" if typ is not None and optional_inner(typ) is not None else ""
    if meta.get("choices") is not None and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{where}{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}.{hint}")
    if meta.get("min") is not None and value < meta["min"]:
        raise UserError(f"{where}{key}: {value!r} is below the minimum {meta['min']}{unset}.")
    if meta.get("max") is not None and value > meta["max"]:
        raise UserError(f"{where}{key}: {value!r} is above the maximum {meta['max']}.")


def set_key(cfg: Any, key: str, value: Any, where: str = "") -> None:
    """Set a dotted `key` on a config instance, coercing and range-checking `value`."""
    parts = key.split(".")
    obj = cfg
    instead = ""  # the enclosing field's note on keys it lacks
    for i, part in enumerate(parts):
        fmap = {f.name: f for f in fields(obj)}
        if part not in fmap:
            raise _unknown_key(type(cfg), key, where, instead)
        f = fmap[part]
        instead = f.metadata.get("unknown", "")
        typ = _hints(type(obj))[part]
        if i < len(parts) - 1:
            if not is_dataclass(typ):
                raise _unknown_key(type(cfg), key, where)
            obj = getattr(obj, part)
            continue
        if typ is AlgorithmConfig and isinstance(value, str):  # algo=NAME names a preset
            _apply_preset(cfg, ".".join(parts[:-1]), value, f"{where}{key}")
            return
        if isinstance(obj, AlgorithmConfig) and part == "name":  # algo.name=NAME does too
            _apply_preset(cfg, ".".join(parts[:-2]), _coerce(value, str, key, where), f"{where}{key}")
            return
        if is_dataclass(typ):
            if not isinstance(value, dict):
                raise UserError(f"{where}{key}: expected a mapping of options, got {value!r}.")
            for k, v in value.items():
                set_key(cfg, f"{key}.{k}", v, where)
            return
        coerced = _coerce(value, typ, key, where)
        _check_range(coerced, f, key, where, typ)
        setattr(obj, part, coerced)


def algorithm_presets() -> list[str]:
    """Names of the algorithm presets (`algo=NAME`), from src/ppo_rlhf/algo/presets/NAME.yaml."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _apply_preset(cfg: Any, prefix: str, name: str, where: str) -> None:
    """Set the keys of the preset `name` on the RL config at `prefix` (e.g. "" or "ppo"), then
    record the name. A preset is a YAML mapping of RL-config keys; later settings override it."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        names = algorithm_presets()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{where}: no algorithm preset {name!r}; presets: {', '.join(names)}.{hint}")
    head = f"{prefix}." if prefix else ""
    for k, v in _flatten(load_yaml(path), where=f"{path}: "):
        set_key(cfg, head + k, v, where=f"{path}: ")
    algo = cfg
    for part in (head + "algo").split("."):
        algo = getattr(algo, part)
    algo.name = name


def _selects_preset(key: str) -> bool:
    return key in ("algo", "algo.name") or key.endswith((".algo", ".algo.name"))


def _flatten(d: dict, prefix: str = "", where: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if not isinstance(k, str):
            raise UserError(f"{where}config key {prefix}{k!r} must be a string (quote it, or fix the YAML)")
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}.", where))
        else:
            out.append((prefix + k, v))
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p} (see configs/ for examples)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of options at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML so numbers/bools/strings work naturally."""
    if "=" not in text:
        raise UserError(f"cannot read '{text}': overrides look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"cannot read '{text}': the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        value = raw
    return key, value


def build_config(cls: type, yaml_path: str | Path | None = None, overrides: list[str] = (),
                 base: dict | None = None) -> Any:
    """Defaults <- `base` dict <- YAML file <- dotted overrides; validated."""
    cfg = cls()
    settings = [(k, v, "") for k, v in _flatten(base or {})]
    if yaml_path:
        settings += [(k, v, f"{yaml_path}: ") for k, v in _flatten(load_yaml(yaml_path), where=f"{yaml_path}: ")]
    settings += [(*parse_override(text), "command line: ") for text in overrides]
    # An algorithm preset (algo=NAME) is a base: it is applied first, whatever its position.
    settings.sort(key=lambda s: not _selects_preset(s[0]))
    for k, v, where in settings:
        set_key(cfg, k, v, where=where)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config (for summary.json and checkpoints)."""
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf option of a config class."""
    return describe_instance(cls(), prefix)


def describe_instance(obj: Any, prefix: str) -> list[tuple[str, str, Any, str]]:
    rows = []
    hints = _hints(type(obj))
    for f in fields(obj):
        t = hints[f.name]
        if is_dataclass(t):
            nested = describe_instance(getattr(obj, f.name), f"{prefix}{f.name}.")
            sets = {f"{prefix}{f.name}.{k}": v for k, v in f.metadata.get("sets", {}).items()}
            rows.extend((key, typ, default, f"Set by the pipeline to {sets[key]} unless given. "
                         + doc.replace(" (required).", ".")) if key in sets else (key, typ, default, doc)
                        for key, typ, default, doc in nested)
        else:
            rows.append(_row(f, t, getattr(obj, f.name), prefix))
    return rows


def _row(f: dataclasses.Field, t: Any, default: Any, prefix: str) -> tuple[str, str, Any, str]:
    help_text = f.metadata.get("help", "")
    if f.metadata.get("choices"):
        help_text += f" One of: {', '.join(map(str, f.metadata['choices']))}."
    return prefix + f.name, _type_name(t), default, help_text


def help_text(cls: type) -> str:
    """The option list shown by `--help`."""
    lines = [(cls.__doc__ or "").strip(), "", "Options (set in a YAML file with --config, or as key=value):"]
    for key, typ, default, doc in describe(cls):
        lines.append(f"  {key}={default!r}  ({typ})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def markdown_reference() -> str:
    """docs/configuration.md: every stage's options, generated from the docstrings."""
    out = ["# Configuration reference", "",
           "Generated from the config dataclasses in `src/ppo_rlhf/config.py` "
           "(`python -m ppo_rlhf.config > docs/configuration.md`); a test keeps it in sync.", ""]
    for name, cls in STAGE_CONFIGS.items():
        if name in ("pipeline", "rl"):  # rl is ppo's other name; the pipeline nests the stages
            continue
        out += [f"## `ppo-rlhf {name}`", "", (cls.__doc__ or "").strip(), "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, typ, default, doc in describe(cls):
            out.append(f"| `{key}` | {typ} | `{default!r}` | {doc.replace('|', '/')} |")
        out.append("")
    out += ["## `ppo-rlhf pipeline`", "",
            (PipelineConfig.__doc__ or "").strip(),
            "", "Top-level keys: `task`, `data_dir`, `gold`, `eval_fraction`, `algo`, `out_dir`, `seed`, "
            "`model`, `compare`; each stage's options nest under its name (`sft.optim.lr=1e-3`, "
            "`ppo.train.updates=40`). Settings you give are kept; the pipeline fills in only those "
            "left at their defaults (paths, seeds, the task).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_reference())
