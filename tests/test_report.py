"""Tests of the HTML run report (ppo_rlhf.report) on synthetic run directories."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
from browser import chromium, save_screenshot, set_viewport  # noqa: F401  (chromium is a fixture)

from ppo_rlhf.errors import UserError
from ppo_rlhf.report import (
    ema,
    paired_by_step,
    pick_sample_steps,
    series,
    smoothing_weight,
    write_report,
)

IMG = '<img src="data:image/png;base64,'
NASTY = "<script>alert('x')</script> & \"quoted\""


def _write_lines(path: Path, records: list[dict], torn_tail: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + (torn_tail or ""), encoding="utf-8")


def make_ppo_dir(stage_dir: Path, steps: int = 300, with_eval: bool = True, torn: bool = True) -> None:
    """PPO metrics shaped like a real run: noisy rising rewards, growing KL, nulls, a torn tail."""
    rng = random.Random(0)
    records = []
    for step in range(steps):
        kl = 0.02 * step + rng.gauss(0, 0.3)
        true_gold = 1 - math.exp(-step / 60) - 0.003 * max(0, step - 150)  # rises, then over-optimised
        gold = true_gold + rng.gauss(0, 0.1)
        records.append(
            {
                "step": step,
                "time": 1.5 * step,
                "stage": "ppo",
                "objective/rlhf_reward": gold - 0.05 * kl,
                "objective/rm_score": 0.01 * step + rng.gauss(0, 0.2),
                "objective/gold_reward": gold,
                "objective/kl": kl,
                "kl_ctl/beta": 0.1 * (1 + step / 1000),
                "objective/entropy": None if step % 37 == 0 else 2.0 - step / 400,
                "rollout/response_length": 12 + rng.random() * 4,
                "policy/approx_kl": 0.01 * rng.random(),
                "policy/clipfrac": 0.1 * rng.random(),
                "value/explained_variance": min(1.0, step / 200),
                "value/clipfrac": 0.05,
                "loss/policy": rng.gauss(0, 0.1),
                "loss/value": 1 / (1 + step),
                "perf/tokens_per_s": 900 + rng.random() * 100,
                "time/generate": 0.4,
                "time/score": 0.1,
                "time/train": 0.6,
            }
        )
        if with_eval and step % 50 == 0:
            records.append(
                {
                    "step": step,
                    "time": 1.5 * step,
                    "stage": "ppo",
                    "eval/gold_reward": true_gold,
                    "eval/rm_score": 0.01 * step,
                    "eval/kl": max(0.0, 0.02 * step),
                }
            )
    torn_tail = '{"step": 300, "objective/kl": 0.' if torn else None
    _write_lines(stage_dir / "metrics.jsonl", records, torn_tail=torn_tail)
    samples = [
        {
            "step": step,
            "prompt": f"prompt {i} at {step} {NASTY}",
            "response": f"response {i} at {step}\nline 2",
            "rm_score": 0.1 * i,
            "gold_reward": None if i == 0 else 0.5,
        }
        for step in range(0, steps, 50)
        for i in range(4)
    ]
    _write_lines(stage_dir / "samples.jsonl", samples)


def make_run(run: Path, torn: bool = True) -> Path:
    """A pipeline run dir with sft, reward and ppo stages and a summary.json."""
    sft = [
        {
            "step": s,
            "time": float(s),
            "stage": "sft",
            "sft/train_loss": 3 * math.exp(-s / 60) + 0.5,
            "sft/lr": 1e-3 * min(1.0, s / 20),
        }
        for s in range(200)
    ]
    sft += [
        {
            "step": s,
            "time": float(s),
            "stage": "sft",
            "sft/eval_loss": 3 * math.exp(-s / 60) + 0.6,
            "sft/eval_ppl": math.exp(3 * math.exp(-s / 60) + 0.6),
        }
        for s in range(0, 200, 20)
    ]
    _write_lines(run / "sft" / "metrics.jsonl", sft)
    rm = [
        {
            "step": s,
            "time": float(s),
            "stage": "reward",
            "rm/train_loss": 0.69 * math.exp(-s / 100),
            "rm/train_acc": 0.5 + 0.4 * (1 - math.exp(-s / 50)),
        }
        for s in range(150)
    ]
    rm += [
        {
            "step": s,
            "time": float(s),
            "stage": "reward",
            "rm/eval_loss": 0.7 * math.exp(-s / 120),
            "rm/eval_acc": 0.5 + 0.3 * (1 - math.exp(-s / 50)),
        }
        for s in range(0, 150, 25)
    ]
    _write_lines(run / "reward" / "metrics.jsonl", rm)
    make_ppo_dir(run / "ppo", torn=torn)
    (run / "summary.json").write_text(
        json.dumps(
            {
                "sft_gold_reward": 0.02,
                "ppo_gold_reward": 0.69,
                "final_kl": 5.7,
                "rm_accuracy": 0.74,
                "stage_seconds": {"sft": 41.2, "reward": 18.9, "ppo": 230.5},
            }
        )
    )
    return run


def test_full_run_report(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    out = write_report(run)
    assert out == run / "report.html"
    text = out.read_text(encoding="utf-8")
    # 7 PPO curves + 7 diagnostics (no loss/ptx) + 3 SFT + 2 RM + 1 over-optimisation plot.
    assert text.count(IMG) == 20
    for title in (
        "Reward: RM score − β·KL",
        "Reward-model score",
        "Gold reward",
        "KL coefficient β",
        "Policy entropy",
        "Response length",
        "SFT loss",
        "Reward-model accuracy",
        "Over-optimisation",
    ):
        assert f'alt="{title}' in text, title
    assert (
        "From eval/kl, eval/gold_reward" in text
    )  # the over-optimisation plot used the held-out evals
    assert "Held-out accuracy: <b>80.0%</b>" not in text and "Held-out accuracy: <b>" in text
    assert "<code>loss/ptx</code>" in text  # missing metric: a note, not a crash
    assert "1 unreadable line(s)" in text  # the torn last line
    assert "0.02 → 0.69" in text and "74.0%" in text and "4 min 51 s" in text
    # Samples: first, middle and last steps, everything escaped.
    assert "prompt 0 at 0 " in text and "prompt 0 at 150 " in text and "prompt 0 at 250 " in text
    assert "prompt 0 at 50 " not in text
    assert html_escaped(NASTY) in text and "<script>" not in text
    # Self-contained: no URL that a browser would fetch.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def html_escaped(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#x27;")
    )


def test_single_stage_dir_and_out_path(tmp_path: Path) -> None:
    make_ppo_dir(tmp_path / "ppo", with_eval=False)
    out = write_report(tmp_path / "ppo", tmp_path / "elsewhere" / "r.html")
    text = out.read_text(encoding="utf-8")
    assert out == tmp_path / "elsewhere" / "r.html"
    assert text.count(IMG) == 15
    assert (
        "From objective/kl, objective/gold_reward" in text
    )  # no eval/* metrics: falls back to the rollout values
    assert "No summary.json" in text


def test_missing_metrics_are_notes_not_errors(tmp_path: Path) -> None:
    stage = tmp_path / "ppo"
    _write_lines(
        stage / "metrics.jsonl",
        [{"step": s, "objective/kl": None if s == 3 else 0.1 * s} for s in range(10)],
    )
    text = write_report(stage).read_text(encoding="utf-8")
    assert text.count(IMG) == 1
    assert 'alt="KL(policy' in text
    assert "<code>objective/gold_reward</code>" in text and "<code>kl_ctl/beta</code>" in text
    assert (
        "Not plotted: needs objective/kl with objective/gold_reward." in text
    )  # no RM score logged: a run without a reward model


def test_no_metrics_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "missing"))):
        write_report(tmp_path / "missing")
    (tmp_path / "empty" / "ppo").mkdir(parents=True)
    with pytest.raises(UserError, match="no metrics found"):
        write_report(tmp_path / "empty")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"step": 0, "objective/k')
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "torn"))):
        write_report(tmp_path / "torn")


def test_series_skips_nulls_nan_and_non_numbers() -> None:
    records = [
        {"step": 2, "m": 1.0},
        {"step": 0, "m": None},
        {"step": 1, "m": float("nan")},
        {"step": 3, "m": True},
        {"step": 4, "m": "x"},
        {"step": 5, "m": 7},
        {"step": 6},
    ]
    assert series(records, "m") == ([2, 5], [1.0, 7.0])


def test_paired_by_step_joins_lines_of_the_same_step() -> None:
    records = [
        {"step": 0, "kl": 0.0},
        {"step": 0, "gold": 1.0},
        {"step": 1, "kl": 4.0, "gold": None},
        {"step": 2, "kl": 9.0, "gold": 3.0},
    ]
    assert paired_by_step(records, "kl", "gold") == ([0.0, 9.0], [1.0, 3.0])


def test_ema_is_debiased() -> None:
    # avg: 0.5, 1.25, 2.125; normaliser: 0.5, 0.75, 0.875.
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 2.125 / 0.875])


def test_only_noisy_long_curves_are_smoothed() -> None:
    assert smoothing_weight([min(1.0, s / 20) for s in range(200)]) == 0.0  # a warm-up schedule
    assert smoothing_weight([(-1) ** s for s in range(10)]) == 0.0  # too short
    assert smoothing_weight([(-1) ** s for s in range(50)]) == 0.6
    assert smoothing_weight([(-1) ** s + s / 100 for s in range(200)]) == 0.9
    assert smoothing_weight([3.0] * 100) == 0.0


def test_pick_sample_steps() -> None:
    assert pick_sample_steps([{"step": s} for s in (40, 0, 10, 20, 30, 0)]) == [0, 20, 40]
    assert pick_sample_steps([{"step": 5}, {"step": 5}]) == [5]
    assert pick_sample_steps([]) == []


@pytest.mark.browser
def test_report_renders_in_chromium(tmp_path: Path, chromium, monkeypatch) -> None:  # noqa: F811
    monkeypatch.chdir(tmp_path)  # a relative run dir, as users pass it (and as the screenshot shows)
    out = write_report(make_run(Path("runs") / "demo", torn=False)).resolve()
    set_viewport(chromium, 1280, 1150)
    chromium.get(out.as_uri())
    images = chromium.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
    )
    assert len(images) == 20
    assert all(complete and width > 0 for _alt, complete, width in images), images
    chromium.execute_script("window.scrollTo(0, 0);")
    save_screenshot(chromium, "report.png")


def test_hand_chained_run_gets_its_summary_from_the_stage_summaries(tmp_path: Path) -> None:
    """Stages run one by one into any directory names: no run summary.json, still a full report."""
    run = tmp_path / "chained"
    _write_lines(run / "my-sft" / "metrics.jsonl", [{"step": s, "stage": "sft", "sft/train_loss": 1.0 / (s + 1)}
                                                    for s in range(5)])
    (run / "my-sft" / "summary.json").write_text(json.dumps({"stage": "sft", "gold_reward": 0.25, "seconds": 61}))
    _write_lines(run / "rm" / "metrics.jsonl", [{"step": s, "rm/train_loss": 0.7} for s in range(5)])
    (run / "rm" / "summary.json").write_text(json.dumps({"stage": "reward", "eval_accuracy": 0.8}))
    make_ppo_dir(run / "rl-run", steps=20)
    (run / "rl-run" / "summary.json").write_text(json.dumps({"stage": "ppo", "gold_reward": 0.75, "kl": 1.5,
                                                            "seconds": 125}))
    text = write_report(run).read_text(encoding="utf-8")
    assert "No summary.json" not in text
    assert "0.25 → 0.75" in text  # the gold-reward card: SFT -> PPO
    assert "80.0%" in text and "1.5 nats" in text
    assert "gathered from the stages&#x27; summary.json files" in text


def test_reward_function_means_are_plotted(tmp_path: Path) -> None:
    stage = tmp_path / "ppo"
    _write_lines(stage / "metrics.jsonl", [{"step": s, "objective/kl": 0.1 * s, "reward_fn/exact": s / 10,
                                            "reward_fn/format": 1.0} for s in range(10)])
    text = write_report(stage).read_text(encoding="utf-8")
    assert 'alt="Reward functions (mean per rollout)"' in text


def test_a_stage_summary_explains_its_duplicates_count(tmp_path: Path) -> None:
    stage = tmp_path / "sft"
    _write_lines(stage / "metrics.jsonl", [{"step": s, "sft/train_loss": 1.0} for s in range(3)])
    (stage / "summary.json").write_text(json.dumps({"stage": "sft", "duplicates": 144}))
    text = write_report(stage).read_text(encoding="utf-8")
    assert "exact duplicate records in the training file (kept: repetition is the data" in text


def test_rl_section_is_named_for_its_algorithm_and_plots_the_reward_it_had(tmp_path: Path) -> None:
    """A GRPO run with reward functions and no RM: "RL: GRPO", the reward titled by its source with
    the KL where the preset puts it (the reward), and no RM-score curve (nor a note that it is missing)."""
    rl = tmp_path / "rl-run"
    records = [{"step": s, "time": float(s), "stage": "grpo", "objective/rlhf_reward": 0.1 * s,
                "reward_fn/length_bonus": 0.1 * s, "objective/kl": 0.01 * s, "objective/score": 0.1 * s}
               for s in range(1, 6)]
    _write_lines(rl / "metrics.jsonl", records)
    text = write_report(rl).read_text(encoding="utf-8")
    assert "<h2>RL: GRPO</h2>" in text and "GRPO diagnostics" in text
    assert 'alt="Reward: length_bonus − β·KL"' in text  # from the grpo preset's kl_in
    assert "Reward-model score" not in text and "objective/rm_score" not in text
    # the summary's config wins over the preset: KL in the loss, with an RM
    (rl / "summary.json").write_text(json.dumps({"stage": "rl", "algo": "grpo", "config": {
        "reward_model": "rm", "algo": {"kl_in": "loss"}}}))
    text = write_report(rl).read_text(encoding="utf-8")
    assert 'alt="Reward: (RM score + length_bonus) (KL in the loss)"' in text


def test_old_ppo_runs_still_read_as_the_rl_stage(tmp_path: Path) -> None:
    make_ppo_dir(tmp_path / "run" / "ppo")
    (tmp_path / "run" / "ppo" / "summary.json").write_text(json.dumps({"stage": "ppo", "gold_reward": 0.5}))
    text = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "<h2>RL: PPO</h2>" in text and 'alt="Reward: RM score − β·KL"' in text


def test_summary_cards_show_greedy_beside_sampled_gold_and_config_as_tables(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary.update(sft_gold_reward_greedy=0.1, ppo_gold_reward_greedy=0.8, eval_temperature=0.7, algo="grpo",
                   config={"task": "arithmetic", "sft": {"optim": {"lr": 0.001}, "max_steps": 0},
                           "ppo": {"algo": {"name": "grpo"}}})
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text(encoding="utf-8")
    assert "Gold reward (sampled, T=0.7)" in text and "0.02 → 0.69" in text and "+0.67 from GRPO" in text
    assert "Gold reward (greedy)" in text and "0.1 → 0.8" in text
    assert "<summary>config: sft (2 options)</summary>" in text and "<th>optim.lr</th>" in text
    assert "<summary>config: run (1 options)</summary>" in text
    assert '{&quot;' not in text and '{"optim"' not in text  # no config dumped as one line of JSON
