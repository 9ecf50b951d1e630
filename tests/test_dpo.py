"""The DPO stage: every preference loss runs and moves the policy; the first loss is the one of
policy = reference (frozen copy and LoRA base); a step's gradient is the same in one piece, in
micro-batches and over two (simulated) ranks; resume is exact; the loss decreases; online DPO
labels its own samples; settings that do nothing are refused; two real DDP ranks on gloo match
one process."""

import json
import math
import os
import random
import signal

import pytest
import torch

from ppo_rlhf import distributed as dist
from ppo_rlhf.algo.preference import PREFERENCE_LOSSES
from ppo_rlhf.config import DPOConfig, build_config
from ppo_rlhf.errors import UserError
from ppo_rlhf.guards import NonFiniteGuard
from ppo_rlhf.models import load_causal_lm, load_scalar_model, save_model
from ppo_rlhf.stages import dpo
from ppo_rlhf.stages.loop import StepContext
from ppo_rlhf.tasks import get_task
from ppo_rlhf.tokenizer import train_tokenizer

WALL_CLOCK = ("time", "time/", "perf/")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A tokenizer, a random tiny 'SFT' model, a reward model on its trunk, and arithmetic files."""
    root = tmp_path_factory.mktemp("dpo")
    task, rng = get_task("arithmetic"), random.Random(0)
    tok = train_tokenizer(task.tokenizer_corpus(random.Random(0)), 320)
    save_model(load_causal_lm("tiny-gpt2", tok, seed=0), tok, root / "sft")
    rm = load_scalar_model(str(root / "sft"), tok, init_from_causal_lm=True, head_init_std=0.02, seed=1)
    save_model(rm, tok, root / "rm")
    prompts = task.sample_prompts(80, rng)
    pairs = []
    for p in prompts:
        chosen, rejected = task.demonstration(p, rng), task.candidate(p, rng)
        if chosen.strip() and rejected.strip() and chosen != rejected:
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    write_jsonl(root / "prefs.jsonl", pairs[:40])
    write_jsonl(root / "prefs_eval.jsonl", pairs[40:53])
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts[:32]])
    write_jsonl(root / "prompts_eval.jsonl", [{"prompt": p} for p in prompts[60:70]])
    return root


def args(fx, out, *extra, online=False):
    base = [f"out_dir={out}", f"policy={fx / 'sft'}", f"eval_file={fx / 'prefs_eval.jsonl'}",
            f"eval_prompts_file={fx / 'prompts_eval.jsonl'}", "eval_samples=6", "task=arithmetic",
            "batch_size=8", "optim.lr=1e-3", "run.tensorboard=false", "run.eval_every=2", "run.save_every=2",
            "run.device=cpu"]
    if online:
        base += [f"prompts_file={fx / 'prompts.jsonl'}", f"reward_model={fx / 'rm'}", "online.enabled=true",
                 "online.rounds=2", "online.prompts_per_round=8", "online.max_new_tokens=6",
                 "online.truncated=keep"]  # the random model rarely ends with EOS
    else:
        base += [f"train_file={fx / 'prefs.jsonl'}", "max_steps=3"]
    return build_config(DPOConfig, overrides=[*base, *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(records):
    return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in records]


def weights(model_dir):
    from safetensors.torch import load_file
    return load_file(model_dir / "model.safetensors")


def grads(stage, idx):
    stage.opt.zero_grad(set_to_none=True)
    stage.model.train()
    mism = stage.mismatched_logps(stage.data, idx) if stage.entry.needs_mismatched else None
    for micro in dpo.common.micro_batches(dist.shard(idx), stage.cfg.grad_accum):
        out = stage.entry.fn(stage.pair_batch(stage.ddp_model, stage.data, micro, mism), stage.loss_params)
        (out.losses.sum() * dist.world_size() / len(idx)).backward()
    return [p.grad.clone() for p in stage.params]


@pytest.mark.parametrize("loss", sorted(PREFERENCE_LOSSES))
def test_every_loss_runs_moves_the_policy_and_logs_the_evaluation(fx, tmp_path, loss):
    out = tmp_path / loss
    summary = dpo.run_dpo(args(fx, out, f"loss={loss}"))
    assert summary["stage"] == "dpo" and summary["loss"] == loss and summary["steps"] == 3
    before, after = weights(fx / "sft"), weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in after)
    keys = {k for r in metrics(out) for k in r}
    assert {"train/loss", "train/chosen_reward", "train/rejected_reward", "train/margin", "train/accuracy",
            "eval/margin", "eval/accuracy", "eval/gold_reward", "eval/gold_reward_greedy", "eval/kl",
            "eval/kl_greedy"} <= keys, keys
    for key in ("gold_reward", "gold_reward_greedy", "kl", "accuracy", "margin", "seconds"):
        assert math.isfinite(summary[key]), key
    assert (out / "samples.jsonl").is_file()


@pytest.mark.parametrize("lora", [False, True])
def test_the_first_dpo_loss_is_log_2_because_the_policy_starts_as_the_reference(fx, tmp_path, lora):
    extra = ["model.lora_r=4"] if lora else []
    cfg = args(fx, tmp_path / "x", "loss=dpo", "beta=0.5", *extra)
    stage = dpo.DPOStage(cfg, torch.device("cpu"))
    assert (stage.reference.lora_policy is not None) == lora
    m = stage.step(StepContext(1, NonFiniteGuard(5), None)).metrics
    assert m["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m["train/margin"] == pytest.approx(0.0, abs=1e-5)
    # and the step moved the policy away from the reference
    assert stage.step(StepContext(2, NonFiniteGuard(5), None)).metrics["train/loss"] != pytest.approx(math.log(2))


@pytest.mark.parametrize("loss", ["dpo", "kto", "simpo"])
def test_a_step_gradient_is_the_same_in_one_piece_in_micro_batches_and_over_two_ranks(fx, tmp_path, loss,
                                                                                       monkeypatch):
    """Two ranks are simulated in one process: each backpropagates its pairs' loss times the world
    size, and DDP's gradient is the mean over the ranks. KTO's reference point is computed on the
    whole global batch, so it does not depend on the split either."""
    idx = list(range(8))
    fp32 = "run.dtype=float32"  # exact arithmetic: bf16 (auto on AMX CPUs) rounds a split batch differently
    one = dpo.DPOStage(args(fx, tmp_path / "a", f"loss={loss}", fp32), torch.device("cpu"))
    want = grads(one, idx)
    accum = dpo.DPOStage(args(fx, tmp_path / "b", f"loss={loss}", "grad_accum=3", fp32), torch.device("cpu"))
    for w, g in zip(want, grads(accum, idx)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    per_rank = []
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    for r in range(2):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        per_rank.append(grads(one, idx))
    for w, g0, g1 in zip(want, *per_rank):
        torch.testing.assert_close((g0 + g1) / 2, w, rtol=1e-4, atol=1e-6)


def test_precomputed_reference_log_probs_equal_the_per_step_ones(fx, tmp_path):
    runs = {}
    for pre in ("true", "false"):
        out = tmp_path / pre
        dpo.run_dpo(args(fx, out, f"precompute_ref={pre}", "run.eval_every=0"))
        runs[pre] = [r for r in metrics(out) if "train/loss" in r]
    for a, b in zip(runs["true"], runs["false"]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_run_stopped_by_a_signal_resumes_exactly(fx, tmp_path, monkeypatch, mode):
    online = mode == "online"
    extra = ["online.rounds=4"] if online else ["max_steps=5", "loss=kto"]
    straight = tmp_path / "straight"
    dpo.run_dpo(args(fx, straight, *extra, "run.save_every=1", online=online))
    resumed = tmp_path / "resumed"
    cfg = args(fx, resumed, *extra, "run.save_every=1", online=online)
    step = dpo.DPOStage.step

    def interrupt_at_2(self, ctx):
        result = step(self, ctx)
        if ctx.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(dpo.DPOStage, "step", interrupt_at_2)
    assert dpo.run_dpo(cfg) == {"stopped_at": 2}
    monkeypatch.setattr(dpo.DPOStage, "step", step)
    dpo.run_dpo(cfg, resume=True)
    assert numbers(metrics(resumed)) == numbers(metrics(straight))
    want, got = weights(straight / "model"), weights(resumed / "model")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_dpo_loss_decreases_and_the_margin_grows(fx, tmp_path):
    out = tmp_path / "learn"
    dpo.run_dpo(args(fx, out, "max_steps=30", "run.eval_every=0", "optim.lr=3e-3", "beta=0.5"))
    train = [r for r in metrics(out) if "train/loss" in r]
    first, last = train[:5], train[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "train/loss") < mean(first, "train/loss") - 0.2
    assert mean(last, "train/margin") > mean(first, "train/margin") + 0.5
    assert mean(last, "train/accuracy") > 0.8


def test_online_dpo_samples_labels_and_trains_on_its_own_pairs(fx, tmp_path):
    out = tmp_path / "online"
    summary = dpo.run_dpo(args(fx, out, online=True))
    assert summary["online"] is True and summary["steps"] == 2
    rounds = [r for r in metrics(out) if "online/pairs" in r]
    assert len(rounds) == 2
    for r in rounds:
        assert r["online/pairs"] + r["online/ties"] == 8
        assert r["online/optimizer_steps"] == math.ceil(r["online/pairs"] / 8)
    before, after = weights(fx / "sft"), weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_online_labels_prefer_the_higher_score_and_skip_ties(fx, tmp_path, monkeypatch):
    """A reward function that likes short responses: every chosen response is shorter than its
    rejected one, and equal lengths are ties."""
    (tmp_path / "short.py").write_text("def short(prompts, responses, **_):\n"
                                       "    return [-float(len(r)) for r in responses]\n")
    cfg = args(fx, tmp_path / "o", "reward_model=", f"online.functions={tmp_path / 'short.py'}:short",
               "online.temperature=2.0", online=True)
    stage = dpo.DPOStage(cfg, torch.device("cpu"))
    pairs, label = stage.sample_pairs(list(range(16)), 1)
    tok = stage.tokenizer
    for p in pairs:
        chosen = tok.decode(p.chosen_ids[p.prompt_len:], skip_special_tokens=True)
        rejected = tok.decode(p.rejected_ids[p.prompt_len:], skip_special_tokens=True)
        assert len(chosen) < len(rejected)
    assert label["online/pairs"] == len(pairs) and label["online/ties"] == 16 - len(pairs)


@pytest.mark.parametrize("extra,match", [
    (["loss=dpo", "gamma=1.0"], "gamma=1.0 does nothing with loss=dpo: only simpo"),
    (["loss=ipo", "label_smoothing=0.1"], "label_smoothing"),
    (["online.rounds=3"], "online.rounds is only read by online DPO"),
    (["loss=kto", "batch_size=1"], "batch_size must be at least 2"),
])
def test_settings_that_do_nothing_or_cannot_work_are_refused(fx, tmp_path, extra, match):
    with pytest.raises(UserError, match=match):
        dpo.run_dpo(args(fx, tmp_path / "x", *extra))


def test_online_without_a_labeller_or_with_a_train_file_is_refused(fx, tmp_path):
    with pytest.raises(UserError, match="reward_model or online.functions"):
        dpo.run_dpo(args(fx, tmp_path / "x", "reward_model=", online=True))
    with pytest.raises(UserError, match="train_file is not read by online DPO"):
        dpo.run_dpo(args(fx, tmp_path / "x", f"train_file={fx / 'prefs.jsonl'}", online=True))


def test_two_ddp_ranks_on_gloo_match_one_process(fx, tmp_path):
    """`torchrun --nproc_per_node 2 ppo-rlhf dpo` (KTO: the mismatched reference point too, and
    grad_accum) logs the trajectory of one process within 1e-5."""
    from test_distributed import assert_same_trajectory, torchrun

    extra = ["loss=kto", "grad_accum=2", "max_steps=3", "run.eval_every=2", "run.seed=3", "run.dtype=float32"]
    dpo.run_dpo(build_config(DPOConfig, overrides=_cli_args(fx, tmp_path / "one", extra)))
    torchrun("dpo", _cli_args(fx, tmp_path / "ddp", extra))
    assert_same_trajectory(tmp_path / "one", tmp_path / "ddp",
                           {"train/loss", "train/margin", "eval/accuracy", "eval/gold_reward", "eval/kl"})


def _cli_args(fx, out, extra):
    return [f"out_dir={out}", f"policy={fx / 'sft'}", f"eval_file={fx / 'prefs_eval.jsonl'}",
            f"eval_prompts_file={fx / 'prompts_eval.jsonl'}", "eval_samples=6", "task=arithmetic",
            "batch_size=8", "optim.lr=1e-3", "run.tensorboard=false", "run.save_every=2", "run.device=cpu",
            f"train_file={fx / 'prefs.jsonl'}", *extra]


TINY_PIPELINE = ["data.n_sft=64", "data.n_prefs=64", "data.n_prompts=32", "data.n_eval=16", "sft.max_steps=3",
                 "sft.batch_size=8", "reward.max_steps=3", "reward.batch_size=8", "reward.norm_samples=8",
                 "ppo.train.updates=2", "ppo.rollout.batch_size=8", "ppo.eval_samples=8", "eval.n=8",
                 "dpo.max_steps=2", "dpo.batch_size=8", "dpo.eval_samples=8", "dpo.online.rounds=2",
                 "dpo.online.prompts_per_round=8", "sft.run.tensorboard=false", "reward.run.tensorboard=false",
                 "ppo.run.tensorboard=false", "dpo.run.tensorboard=false"]


def pipeline(out, *extra):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ppo_rlhf.cli", "pipeline", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=900)


def test_pipeline_compare_runs_each_method_from_one_sft_and_rm_and_reports_them(tmp_path):
    run = tmp_path / "cmp"
    p = pipeline(run, "--task", "arithmetic", "--compare", "ppo,dpo,online_dpo", *TINY_PIPELINE)
    assert p.returncode == 0, p.stderr[-3000:]
    compare = json.loads((run / "compare.json").read_text())
    assert compare["methods"] == ["sft", "ppo", "dpo", "online_dpo"] == sorted(compare["results"], key=compare[
        "methods"].index)
    for name, row in compare["results"].items():
        for key in ("gold_reward", "gold_reward_greedy", "rm_score", "kl", "seconds"):
            assert row[key] is not None and math.isfinite(row[key]), (name, key)
    assert compare["results"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)
    for method in ("ppo", "dpo", "online_dpo"):
        assert (run / method / "model" / "model.safetensors").is_file()
    assert json.loads((run / "online_dpo" / "summary.json").read_text())["online"] is True
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compare"] == compare["results"]
    html = (run / "report.html").read_text()
    assert 'id="compare"' in html and "online_dpo" in html and "Preference optimisation: dpo" in html
    again = pipeline(run, "--task", "arithmetic", "--compare", "ppo,dpo,online_dpo", *TINY_PIPELINE)
    assert again.returncode == 0 and again.stdout.count("skipped") == 8  # 4 shared, 3 methods, compare

    data = pipeline(tmp_path / "mine", "--data", str(run / "data"), "--task", "arithmetic",
                    "--compare", "dpo,kto,grpo", *TINY_PIPELINE)
    assert data.returncode == 0, data.stderr[-3000:]
    assert json.loads((tmp_path / "mine" / "compare.json").read_text())["methods"] == ["sft", "dpo", "kto", "grpo"]
    grpo = json.loads((tmp_path / "mine" / "grpo" / "summary.json").read_text())
    assert grpo["algo"] == "grpo" and grpo["config"]["train"]["updates"] == 2  # the preset, then ppo.* as given
    assert "RL: GRPO" in (tmp_path / "mine" / "report.html").read_text()


def test_a_compared_rl_preset_is_a_base_under_what_you_set(tmp_path):
    from ppo_rlhf.config import PipelineConfig, build_config
    from ppo_rlhf.stages.pipeline import configure, preset_config

    given = {"ppo.optim.lr", "ppo.rollout.batch_size"}
    overrides = ["task=arithmetic", f"out_dir={tmp_path}", "ppo.optim.lr=7e-5", "ppo.rollout.batch_size=24"]
    cfg = configure(build_config(PipelineConfig, overrides=overrides), explicit=given)
    plain = preset_config(cfg, "rloo")
    kept = preset_config(cfg, "rloo", explicit=given | {"task", "ppo.algo"})
    assert plain.algo.name == kept.algo.name == "rloo" and plain.algo.advantage == "rloo"
    assert plain.rollout.batch_size == 16 and kept.rollout.batch_size == 24 and kept.optim.lr == 7e-5
    assert kept.out_dir == str(tmp_path / "rloo") and cfg.ppo.algo.name == "ppo"  # the pipeline's own is untouched


def test_pipeline_compare_refuses_an_unknown_method(tmp_path):
    p = pipeline(tmp_path / "x", "--task", "arithmetic", "--compare", "ppo,dpoo", *TINY_PIPELINE)
    assert p.returncode == 2 and "unknown method(s) dpoo" in p.stderr
