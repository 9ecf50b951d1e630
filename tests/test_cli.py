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
    assert any("eval/gold_reward" in x and "eval/gold_reward_greedy" in x for x in lines)
    assert {x["stage"] for x in lines} == {"ppo"}  # the algorithm's name
    summary = json.loads((run / "ppo" / "summary.json").read_text())
    assert summary["stage"] == "rl" and summary["algo"] == "ppo" and "gold_reward_greedy" in summary
    out = run / "eval.json"
    cli("eval", f"policy={run / 'ppo' / 'model'}", f"reference={run / 'sft' / 'model'}",
        f"reward_model={run / 'reward' / 'model'}", f"prompts_file={d / 'prompts_eval.jsonl'}",
        "task=arithmetic", "n=8", f"out={out}")
    res = json.loads(out.read_text())
    assert {"gold_reward", "gold_reward_greedy", "rm_score", "kl"} <= set(res) and res["temperature"] == 0.7
    greedy = run / "greedy.json"
    cli("eval", f"policy={run / 'ppo' / 'model'}", f"prompts_file={d / 'prompts_eval.jsonl'}",
        "task=arithmetic", "n=8", "temperature=0", f"out={greedy}")
    res = json.loads(greedy.read_text())
    assert res["gold_reward"] == res["gold_reward_greedy"] == json.loads(out.read_text())["gold_reward_greedy"]


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


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory):
    """A tokenizer, a small prompts file with an `answer` field and an untrained tiny policy."""
    from ppo_rlhf.models import load_causal_lm, save_model
    from ppo_rlhf.tasks import get_task
    from ppo_rlhf.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("policy")
    task = get_task("arithmetic")
    tok = train_tokenizer(task.tokenizer_corpus(__import__("random").Random(0)), 320)
    save_model(load_causal_lm("tiny-gpt2", tok, seed=0), tok, root / "model")
    rows = [{"prompt": p, "answer": str(task.answer(p))} for p in task.prompts("eval")[:5]]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_eval_accepts_out_and_says_how_many_samples_per_prompt(capsys, saved_policy):
    out = saved_policy / "eval.json"
    code, _, err = run_main(capsys, "eval", "--out", out, f"policy={saved_policy / 'model'}",
                            f"prompts_file={saved_policy / 'prompts.jsonl'}", "task=arithmetic", "n=12",
                            "max_new_tokens=3")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["n"] == 12 and res["distinct_prompts"] == 5 and res["samples_per_prompt"] == 12 / 5
    assert "has 5 prompts: n=12 samples are 2.4 per prompt" in err


def test_eval_gold_function_receives_the_row_fields(capsys, saved_policy, tmp_path):
    gold = tmp_path / "my_gold.py"
    gold.write_text("def exact(prompts, responses, answer, truncated):\n"
                    "    return [float(r.strip() == a) + (0.5 if t else 0.0) "
                    "for r, a, t in zip(responses, answer, truncated)]\n")
    out = tmp_path / "eval.json"
    code, _, err = run_main(capsys, "eval", f"out={out}", f"policy={saved_policy / 'model'}",
                            f"prompts_file={saved_policy / 'prompts.jsonl'}", f"gold={gold}:exact", "n=5",
                            "max_new_tokens=2")
    assert code == 0, err
    res = json.loads(out.read_text())
    assert 0.0 <= res["gold_reward"] <= 1.5 and res["samples_per_prompt"] == 1.0
    code, _, err = run_main(capsys, "eval", f"policy={saved_policy / 'model'}", "task=arithmetic",
                            f"prompts_file={saved_policy / 'prompts.jsonl'}", f"gold={gold}:exact")
    assert code == 2 and "give one" in err


def test_generate_out_writes_jsonl_rows_and_help_shows_defaults(capsys, saved_policy, tmp_path):
    out = tmp_path / "samples.jsonl"
    code, stdout, err = run_main(capsys, "generate", saved_policy / "model", "--prompts",
                                 saved_policy / "prompts.jsonl", "--out", out, "--max-new-tokens", "3")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == {"prompt", "response"} and stdout == ""
    code, stdout, _ = run_main(capsys, "generate", "--help")
    assert code == 0
    for default in ("(default: 0.7)", "(default: 32)", "sampling seed (default: 0)", "(default: 1.0)"):
        assert default in stdout
    code, stdout, _ = run_main(capsys, "sft", "--help")
    assert "tiny-gpt2       gpt2, 2 layers, hidden 128, 4 heads" in stdout
    assert "model.layers=None" in stdout or "model.layers" in stdout


def test_stage_flags_exist_only_where_the_stage_has_the_key(capsys):
    code, stdout, _ = run_main(capsys, "reward", "--help")
    assert "--out OUT" in stdout and "--task" not in stdout
    code, stdout, _ = run_main(capsys, "eval", "--help")
    assert "shortcut for out=FILE" in stdout


def test_tokenizer_explains_a_smaller_vocabulary(capsys, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "abab abab"}\n')
    code, stdout, err = run_main(capsys, "tokenizer", "--out", tmp_path / "tok", f"texts={texts}",
                                 "vocab_size=512")
    assert code == 0, err
    summary = json.loads((tmp_path / "tok" / "summary.json").read_text())
    assert summary["requested_vocab_size"] == 512 and summary["vocab_size"] < 512
    assert "not the 512 asked for" in summary["vocab_note"] and "ran out of" in err


def test_model_size_from_the_command_line(capsys, saved_policy, tmp_path):
    from transformers import AutoConfig

    from ppo_rlhf.config import SFTConfig, build_config
    from ppo_rlhf.errors import UserError
    from ppo_rlhf.models import load_causal_lm, model_spec
    from ppo_rlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(saved_policy / "model")
    cfg = build_config(SFTConfig, overrides=["model.arch=llama", "model.layers=3", "model.hidden=64",
                                             "model.heads=2"])
    assert model_spec(cfg.model) == "llama:layers=3,hidden=64,heads=2"
    m = load_causal_lm(model_spec(cfg.model), tok).config
    assert (m.model_type, m.num_hidden_layers, m.hidden_size, m.num_attention_heads) == ("llama", 3, 64, 2)
    assert m.vocab_size == len(tok) and m.pad_token_id == tok.pad_token_id and m.eos_token_id == tok.eos_token_id
    # unset sizes come from the preset model.path names
    cfg = build_config(SFTConfig, overrides=["model.path=small-gpt2", "model.layers=1"])
    assert model_spec(cfg.model) == "gpt2:layers=1,hidden=256,heads=4"
    with pytest.raises(UserError, match="not divisible by model.heads=3"):
        model_spec(build_config(SFTConfig, overrides=["model.hidden=64", "model.heads=3"]).model)
    with pytest.raises(UserError, match="is a saved model directory"):
        model_spec(build_config(SFTConfig, overrides=[f"model.path={saved_policy / 'model'}",
                                                      "model.layers=2"]).model)
    # and through `ppo-rlhf sft`
    train = tmp_path / "sft.jsonl"
    train.write_text('{"prompt": "Q: 1+1=", "response": " 2"}\n{"prompt": "Q: 2+1=", "response": " 3"}\n')
    code, _, err = run_main(capsys, "sft", "--out", tmp_path / "sft", f"train_file={train}", "max_steps=1",
                            "batch_size=2", f"model.tokenizer={saved_policy / 'model'}", "model.arch=gpt2",
                            "model.layers=1", "model.hidden=32", "model.heads=2", "run.tensorboard=false")
    assert code == 0, err
    saved = AutoConfig.from_pretrained(tmp_path / "sft" / "model")
    assert (saved.model_type, saved.n_layer, saved.n_embd, saved.n_head) == ("gpt2", 1, 32, 2)


def test_eval_reports_truncated_prompts(capsys, saved_policy):
    from ppo_rlhf.stages.evaluate import load_eval_prompts
    from ppo_rlhf.tokenizer import load_tokenizer

    prompts = load_eval_prompts(str(saved_policy / "prompts.jsonl"), load_tokenizer(saved_policy / "model"), 3)
    assert prompts.truncation.prompts_truncated == 5 and prompts.fields[0]["answer"]
    assert "5 prompts cut from the left to 3 tokens" in capsys.readouterr().err
