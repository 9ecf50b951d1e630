"""Smoke tests: every CLI stage runs for a few steps on a tiny model, in a subprocess, and bad
input gives a short error and exit status 2 without a traceback."""

import json
import os
import subprocess
import sys

import pytest

TINY = ["model.path=tiny-gpt2", "run.tensorboard=false"]


def cli(*args, cwd=None, check=True, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ppo_rlhf.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """tokenizer -> data -> sft -> reward, each for a few steps, shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    cli("tokenizer", "--task", "arithmetic", "--out", root / "tok", "vocab_size=320")
    cli("data", "--task", "arithmetic", "--out", root / "data", "n_sft=64", "n_prefs=64",
        "n_prompts=64", "n_eval=16")
    d = root / "data"
    cli("sft", "--out", root / "sft", f"train_file={d / 'sft_train.jsonl'}", f"eval_file={d / 'sft_eval.jsonl'}",
        f"model.tokenizer={root / 'tok'}", "max_steps=3", "batch_size=8", "task=arithmetic",
        f"eval_prompts_file={d / 'prompts_eval.jsonl'}", *TINY)
    cli("reward", "--out", root / "reward", f"train_file={d / 'prefs_train.jsonl'}",
        f"eval_file={d / 'prefs_eval.jsonl'}", f"model.path={root / 'sft' / 'model'}", "max_steps=3",
        "batch_size=8", "norm_samples=8", f"norm_prompts_file={d / 'prompts_train.jsonl'}", "run.tensorboard=false")
    return root


def test_sft_and_reward_outputs(run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    s = json.loads((run / "sft" / "summary.json").read_text())
    assert s["steps"] == 3 and "eval_loss" in s and "gold_reward" in s
    r = json.loads((run / "reward" / "summary.json").read_text())
    assert 0.0 <= r["eval_accuracy"] <= 1.0 and "reward_gain" in r
    # each stage's output loads in plain transformers
    AutoTokenizer.from_pretrained(run / "sft" / "model")
    AutoModelForCausalLM.from_pretrained(run / "sft" / "model")
    rm = AutoModelForSequenceClassification.from_pretrained(run / "reward" / "model")
    assert rm.config.num_labels == 1
    lines = (run / "sft" / "metrics.jsonl").read_text().splitlines()
    assert any("sft/train_loss" in json.loads(line) for line in lines)


def test_ppo_and_eval(run):
    d = run / "data"
    cli("ppo", "--out", run / "ppo", f"policy={run / 'sft' / 'model'}", f"reward_model={run / 'reward' / 'model'}",
        f"prompts_file={d / 'prompts_train.jsonl'}", f"eval_prompts_file={d / 'prompts_eval.jsonl'}",
        "task=arithmetic", "train.updates=2", "rollout.batch_size=8", "eval_samples=8", "run.eval_every=1",
        "run.tensorboard=false", "loss.ptx_coef=1.0", f"ptx_file={d / 'pretrain.jsonl'}", "loss.ptx_batch_size=4")
    lines = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "objective/kl" in x]
    assert [x["step"] for x in train] == [1, 2]
    for key in ("objective/rlhf_reward", "objective/rm_score", "objective/gold_reward", "kl_ctl/beta",
                "policy/approx_kl", "policy/clipfrac", "value/clipfrac", "value/explained_variance",
                "objective/entropy", "rollout/response_length", "perf/tokens_per_s", "time/generate",
                "time/score", "time/train", "loss/ptx"):
        assert key in train[-1], key
    assert any("eval/gold_reward" in x for x in lines)
    out = run / "eval.json"
    cli("eval", f"policy={run / 'ppo' / 'model'}", f"reference={run / 'sft' / 'model'}",
        f"reward_model={run / 'reward' / 'model'}", f"prompts_file={d / 'prompts_eval.jsonl'}",
        "task=arithmetic", "n=8", f"out={out}")
    res = json.loads(out.read_text())
    assert {"gold_reward", "rm_score", "kl"} <= set(res)


def test_generate(run):
    d = run / "data"
    p = cli("generate", run / "sft" / "model", "--prompts", d / "prompts_eval.jsonl", "--n", "3",
            "--max-new-tokens", "4")
    assert len(p.stdout.strip().splitlines()) == 3


@pytest.mark.parametrize("args, message", [
    (["sft", "train_file=/nonexistent.jsonl", "out_dir=x"], "no such file"),
    (["sft", "optim.lrr=1"], "Did you mean 'optim.lr'"),
    (["ppo", "rollout.top_p=3"], "above the maximum"),
    (["pipeline", "--task", "arithmetc"], "arithmetic"),
    (["report", "/nonexistent-run"], "nonexistent-run"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    p = cli(*args, cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_malformed_data_names_the_line(run, tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "Q: 1+1=", "response": " 2"}\n{"prompt": "Q: 2+2=", "respons": " 4"}\nnot json\n')
    p = cli("sft", "--out", tmp_path / "o", f"train_file={bad}", f"model.tokenizer={run / 'tok'}", "max_steps=1",
            *TINY, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "sft.jsonl:2" in p.stderr and "sft.jsonl:3" in p.stderr


def test_help_lists_documented_options():
    p = cli("ppo", "--help")
    assert "reward.kl_estimator" in p.stdout and "Per-token KL estimator" in p.stdout


def test_tokenizer_from_jsonl_files(run, tmp_path):
    from transformers import AutoTokenizer

    d = run / "data"
    cli("tokenizer", "--out", tmp_path / "tok", f"texts={d / 'sft_train.jsonl'},{d / 'pretrain.jsonl'}",
        "vocab_size=300")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.decode(tok.encode("Q: 3+4= 7")) == "Q: 3+4= 7"
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3


# ---- what tripped a new user (issue 12), in-process: no subprocess start-up --------------------
def run_main(capsys, *args):
    from ppo_rlhf.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_typo_in_model_path_is_named_before_the_tokenizer(capsys, tmp_path):
    train = tmp_path / "sft.jsonl"
    train.write_text('{"prompt": "Q: 1+1=", "response": " 2"}\n')
    code, _, err = run_main(capsys, "sft", f"train_file={train}", f"out_dir={tmp_path / 'o'}",
                            "model.path=gpt2-4x128")
    assert code == 2
    assert "'gpt2-4x128' is neither a local model directory nor a preset" in err
    assert "model.tokenizer is required" not in err


def test_standalone_reward_without_model_path_asks_for_the_sft_model(capsys, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"}\n')
    code, _, err = run_main(capsys, "reward", f"train_file={prefs}", f"out_dir={tmp_path / 'o'}")
    assert code == 2
    assert "model.path is required" in err and "the SFT model" in err
