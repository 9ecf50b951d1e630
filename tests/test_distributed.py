"""N processes compute what one process computes: SFT, reward and PPO under `torchrun
--nproc_per_node 2` (gloo, CPU) against the same stage run in one process with the same global
batch, FSDP2 SFT against it too, and a 2-rank PPO resume. Plus the per-row sampling streams that
make PPO rollouts independent of the world size.

Tolerance: every logged loss/metric (timings excluded) within atol 1e-5 + rtol 1e-4 of the
1-process value; measured max abs differences were ~1e-6 (see docs/distributed.md).
"""

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from ppo_rlhf import distributed as dist
from ppo_rlhf.config import PPOConfig, RewardConfig, SFTConfig, build_config
from ppo_rlhf.generation import generate, row_uniforms
from ppo_rlhf.models import load_causal_lm
from ppo_rlhf.tasks import get_task

RTOL, ATOL = 1e-4, 1e-5
# float32: the claim is of exact arithmetic; bf16 (run.dtype=auto on AMX CPUs) rounds a split batch differently
COMMON = ["run.tensorboard=false", "run.device=cpu", "run.seed=3", "run.dtype=float32"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, arithmetic_models):
    """Tokenizer, an SFT-initialising preset model (the session's, conftest) and small JSONL files
    of the arithmetic task."""
    root = tmp_path_factory.mktemp("dist")
    task, rng = get_task("arithmetic"), random.Random(0)
    (root / "init").symlink_to(arithmetic_models / "sft", target_is_directory=True)
    prompts = task.sample_prompts(96, rng)
    sft = [{"prompt": p, "response": task.demonstration(p, rng)} for p in prompts[:61]]
    pairs = []
    for p in prompts:
        chosen, rejected = task.demonstration(p, rng), task.candidate(p, rng)
        if chosen.strip() and rejected.strip() and chosen != rejected:
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return {
        "root": root,
        "sft": write_jsonl(root / "sft.jsonl", sft[:48]),
        "sft_eval": write_jsonl(root / "sft_eval.jsonl", sft[48:]),  # 13: ranks get 7 and 6
        "prefs": write_jsonl(root / "prefs.jsonl", pairs[:40]),
        "prefs_eval": write_jsonl(root / "prefs_eval.jsonl", pairs[40:53]),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts[:32]]),
        "prompts_eval": write_jsonl(root / "prompts_eval.jsonl", [{"prompt": p} for p in prompts[32:42]]),
        "ptx": write_jsonl(root / "ptx.jsonl", [{"text": t} for t in task.pretrain_texts(16, rng)]),
    }


def sft_args(d, out):
    return [f"out_dir={out}", f"train_file={d['sft']}", f"eval_file={d['sft_eval']}",
            f"model.path={d['root'] / 'init'}", "max_steps=4", "batch_size=8", "grad_accum=2",
            "optim.lr=1e-3", "run.eval_every=2", "task=arithmetic",
            f"eval_prompts_file={d['prompts_eval']}", *COMMON]


def reward_args(d, out, sft_model):
    return [f"out_dir={out}", f"train_file={d['prefs']}", f"eval_file={d['prefs_eval']}",
            f"model.path={sft_model}", "max_steps=4", "batch_size=8", "optim.lr=1e-3",
            "run.eval_every=2", "norm_samples=8", f"norm_prompts_file={d['prompts']}", *COMMON]


def ppo_args(d, out, sft_model, reward_model):
    return [f"out_dir={out}", f"policy={sft_model}", f"reward_model={reward_model}",
            f"prompts_file={d['prompts']}", f"eval_prompts_file={d['prompts_eval']}", "eval_samples=10",
            "task=arithmetic", "train.updates=3", "rollout.batch_size=8", "train.num_minibatches=2",
            "train.ppo_epochs=2", "train.grad_accum=2", "optim.lr=1e-3", "reward.normalize=true",
            "loss.ptx_coef=0.5", f"ptx_file={d['ptx']}", "loss.ptx_batch_size=4", "run.eval_every=2",
            "run.save_every=2", "run.keep_last=3", *COMMON]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The three stages in this process (world size 1): the trajectories to match."""
    from ppo_rlhf.stages.reward import run_reward
    from ppo_rlhf.stages.rl import run_ppo
    from ppo_rlhf.stages.sft import run_sft

    root = tmp_path_factory.mktemp("ref")
    run_sft(build_config(SFTConfig, overrides=sft_args(data, root / "sft")))
    run_reward(build_config(RewardConfig, overrides=reward_args(data, root / "reward", root / "sft" / "model")))
    run_ppo(build_config(PPOConfig, overrides=ppo_args(data, root / "ppo", root / "sft" / "model",
                                                       root / "reward" / "model")))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(stage, args, *flags):
    """`torchrun --nproc_per_node 2 -m ppo_rlhf.cli STAGE ...` on gloo, one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "ppo_rlhf.cli", stage, *flags, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_trajectory(ref_dir, run_dir, required):
    """Same logged steps and keys (only rank 0 logs: no duplicated lines), every number within
    tolerance; returns the largest absolute difference (printed with `pytest -s`)."""
    ref, got = metrics(ref_dir), metrics(run_dir)
    assert [(r["step"], sorted(r)) for r in ref] == [(g["step"], sorted(g)) for g in got]
    assert required <= {k for r in ref for k in r}
    worst = (0.0, "")
    for r, g in zip(ref, got):
        for key, want in r.items():
            if key == "time" or key.startswith(("time/", "perf/")) or not isinstance(want, (int, float)):
                continue
            diff = abs(g[key] - want)
            assert diff <= ATOL + RTOL * abs(want), f"step {r['step']} {key}: 1 process {want}, 2 ranks {g[key]}"
            worst = max(worst, (diff, f"{key}@{r['step']}"))
    print(f"{run_dir.name}: max |2 ranks - 1 process| = {worst[0]:.3g} ({worst[1]})")
    return worst[0]


def test_sft_two_ranks_match_one_process(data, reference, tmp_path):
    torchrun("sft", sft_args(data, tmp_path / "ddp"))
    assert_same_trajectory(reference / "sft", tmp_path / "ddp",
                           {"sft/train_loss", "sft/grad_norm", "sft/eval_loss", "sft/gold_reward"})
    ref = json.loads((reference / "sft" / "summary.json").read_text())
    got = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert got["gold_reward"] == pytest.approx(ref["gold_reward"], abs=ATOL)


def test_fsdp_sft_two_ranks_match_one_process(data, reference, tmp_path):
    """FSDP2 (fully_shard per block + root) with activation checkpointing, fp32 on CPU/gloo; the
    exported model and checkpoint are the unsharded ones."""
    from safetensors.torch import load_file

    out = tmp_path / "fsdp"
    torchrun("sft", [*sft_args(data, out), "run.fsdp=true", "run.activation_checkpointing=true"])
    assert_same_trajectory(reference / "sft", out, {"sft/train_loss", "sft/eval_loss"})
    for f in ("model/model.safetensors", "checkpoints/step_00000004/model.safetensors"):
        want, got = load_file(reference / "sft" / f), load_file(out / f)
        assert sorted(want) == sorted(got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=f"{f}: {k}")


def test_reward_two_ranks_match_one_process(data, reference, tmp_path):
    out = tmp_path / "ddp"
    torchrun("reward", reward_args(data, out, reference / "sft" / "model"))
    assert_same_trajectory(reference / "reward", out, {"rm/train_loss", "rm/train_acc", "rm/eval_acc"})
    ref = json.loads((reference / "reward" / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    for key in ("eval_accuracy", "eval_loss", "reward_gain", "reward_bias"):
        assert math.isclose(got[key], ref[key], rel_tol=RTOL, abs_tol=ATOL), key


def test_ppo_two_ranks_match_one_process_and_resume(data, reference, tmp_path):
    """Rollouts, rewards, whitening, KL control, minibatch losses, PPO-ptx and evaluation; then the
    last update again from the 2-rank checkpoint of update 2 (only rank 0 wrote it, both load it)."""
    out = tmp_path / "ddp"
    args = ppo_args(data, out, reference / "sft" / "model", reference / "reward" / "model")
    torchrun("ppo", args)
    required = {"objective/kl", "objective/rlhf_reward", "objective/gold_reward", "policy/approx_kl",
                "policy/clipfrac", "policy/ratio_max", "loss/policy", "loss/value", "loss/ptx",
                "value/explained_variance", "kl_ctl/beta", "eval/gold_reward", "eval/kl"}
    assert_same_trajectory(reference / "ppo", out, required)
    # responses of different lengths (some end with EOS, some not): the padding to a common length
    # across ranks is exercised
    assert any(0 < m["rollout/truncated_frac"] < 1 for m in metrics(out) if "rollout/truncated_frac" in m)

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    shutil.rmtree(out / "checkpoints" / "step_00000003")
    for name in ("model", "value_model"):
        shutil.rmtree(out / name)
    (out / "summary.json").unlink()
    kept = [m for m in metrics(out) if m["step"] <= 2]
    torchrun("ppo", args, "--resume")
    assert_same_trajectory(reference / "ppo", out, required)
    assert [m for m in metrics(out) if m["step"] <= 2] == kept  # resumed at update 2, not restarted
    assert (out / "model" / "model.safetensors").is_file()


def test_grpo_two_ranks_match_one_process(data, reference, tmp_path):
    """Group rollouts: each rank samples 4 responses to each of its prompts, the groups are
    gathered whole, and the group advantages, the minibatches of whole groups and the
    seq-mean-token-mean loss give the 1-process trajectory. The KL is in the loss here: in the
    reward, a group of identical responses has returns equal only up to rounding (which differs
    with the batch's composition), and GRPO's std scaling magnifies that rounding."""
    from ppo_rlhf.stages.rl import run_rl

    def args(out):
        return [*ppo_args(data, out, reference / "sft" / "model", reference / "reward" / "model"),
                "algo=grpo", "rollout.batch_size=4", "train.updates=2", "algo.kl_in=loss"]

    run_rl(build_config(PPOConfig, overrides=args(tmp_path / "one")))
    torchrun("rl", args(tmp_path / "ddp"))
    assert_same_trajectory(tmp_path / "one", tmp_path / "ddp", {"objective/kl", "loss/policy", "loss/kl",
                                                                 "policy/clipfrac", "eval/gold_reward"})


def test_replay_two_ranks_match_one_process(data, reference, tmp_path):
    """Experience replay under torchrun: every rank holds the gathered rollouts in its buffer and
    draws the same minibatches from the same generator, then backpropagates its rows' share; the
    IS-corrected trajectory is the 1-process one."""
    from ppo_rlhf.stages.rl import run_rl

    def args(out):
        return [*ppo_args(data, out, reference / "sft" / "model", reference / "reward" / "model"),
                "rollout.batch_size=8", "train.updates=3", "train.ppo_epochs=1", "algo.replay_ratio=1.5"]

    run_rl(build_config(PPOConfig, overrides=args(tmp_path / "one")))
    torchrun("rl", args(tmp_path / "ddp"))
    assert_same_trajectory(tmp_path / "one", tmp_path / "ddp", {"objective/kl", "loss/policy", "is/weight_mean",
                                                                 "replay/stale_rows_used", "eval/gold_reward"})


def test_sac_runs_under_two_ranks(data, reference, tmp_path):
    """SAC under torchrun: each rank steps the DDP-wrapped critics and actor on its rows of every
    replayed minibatch. (Its losses are per-rank token means, so the trajectory is not the
    1-process one to the last digit, as the token-weighted losses of the gradient kinds are.)"""
    out = tmp_path / "ddp"
    args = [a for a in ppo_args(data, out, reference / "sft" / "model", reference / "reward" / "model")
            if not a.startswith(("loss.ptx", "ptx_file", "train.ppo_epochs"))]  # a gradient-step loss's options
    torchrun("rl", [*args, "algo=sac", "train.updates=2"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/critic", "loss/actor", "sac/q_mean", "sac/kl"} <= {k for r in rows for k in r}
    assert (out / "model" / "model.safetensors").is_file()


def test_row_seeded_sampling_does_not_depend_on_the_batch(data):
    """A row's sample depends on its seed only: not on the rows beside it or on the padding."""
    from ppo_rlhf.data.collate import pad_left
    from ppo_rlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(data["root"] / "init")
    model = load_causal_lm(str(data["root"] / "init"), tok)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ("Q: 12+7=", "Q: 3+4=", "Q: 100+23=", "Q: 5+5=")]
    seeds = [11, 12, 13, 14]
    kw = {"max_new_tokens": 6, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
          "temperature": 1.0, "top_k": 50}

    def sample(rows, width):
        ids, mask = pad_left([prompts[i] for i in rows], tok.pad_token_id, width)
        resp, rmask = generate(model, ids, mask, row_seeds=[seeds[i] for i in rows], **kw)
        return [r[m].tolist() for r, m in zip(resp, rmask)]

    together = sample([0, 1, 2, 3], None)
    apart = sample([0, 2], 12) + sample([3, 1], None)
    assert together == [apart[0], apart[3], apart[1], apart[2]]
    assert len({tuple(r) for r in together}) > 1
    # the draws of a seed are fixed: the first uniform of seed 11 on every device
    assert row_uniforms([11], 3)[0, 0] == torch.rand(1, generator=torch.Generator().manual_seed(11))[0]


def test_single_process_helpers_are_identities():
    x = torch.arange(6).view(3, 2)
    assert torch.equal(dist.gather_shards(x), x)
    assert dist.shard(list(range(5))) == [0, 1, 2, 3, 4]
    assert dist.all_reduce_dict({"a": 1.5, "b": torch.tensor(2.0)}) == {"a": 1.5, "b": 2.0}
    model = torch.nn.Linear(2, 2)
    with dist.full_params(model):
        assert dist.plain_copy(model) is model
    state = {"model": model, "step": 3}
    assert dist.for_saving(state) is state and dist.for_loading(state) is state
