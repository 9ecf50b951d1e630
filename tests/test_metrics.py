import json
import logging
import math
import sys
import time
import types

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_rlhf.metrics as metrics_module
from ppo_rlhf.errors import UserError
from ppo_rlhf.metrics import (
    MetricsLogger,
    PhaseTimer,
    Progress,
    read_metrics,
    write_summary,
)


def test_log_writes_jsonl_and_tensorboard(tmp_path):
    before = time.time()
    with MetricsLogger(tmp_path, console_every=0) as logger:
        logger.log(1, {"loss/policy": 0.5, "objective/kl": torch.tensor(1.25)}, stage="ppo")
        logger.log(2, {"loss/policy": np.float32(0.25), "perf/tokens": 7})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 1 and first["stage"] == "ppo"
    assert first["loss/policy"] == 0.5 and first["objective/kl"] == 1.25
    assert before <= first["time"] <= time.time()
    assert second == {**second, "step": 2, "stage": None, "loss/policy": 0.25, "perf/tokens": 7}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("objective/kl")] == [(1, 1.25)]


def test_non_finite_values_become_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, console_every=0) as logger:
        logger.log(3, {"a": math.nan, "b": math.inf, "c": torch.tensor(-math.inf), "d": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert (record["a"], record["b"], record["c"], record["d"]) == (None, None, None, 1.0)


def test_none_and_bool_metrics(tmp_path):
    with MetricsLogger(tmp_path, console_every=0) as logger:
        logger.log(1, {"eval/gold": None, "train/early_stopped": True, "a": 1.0})
    record = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert (record["eval/gold"], record["train/early_stopped"]) == (None, 1)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["a", "train/early_stopped"]


def test_reserved_and_non_numeric_metrics_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, console_every=0) as logger:
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 3.0})
        with pytest.raises(TypeError, match="metric 'x' must be a number or None"):
            logger.log(1, {"x": "high"})


def test_console_line(tmp_path, capsys):
    with MetricsLogger(tmp_path, tensorboard=False, console_every=2) as logger:
        logger.log(1, {"loss/lm": 1.0}, stage="sft")
        logger.log(2, {"loss/lm": 0.123456}, stage="sft")
    err = capsys.readouterr().err
    assert "sft step 2 | loss/lm 0.1235" in err
    assert "step 1 " not in err


def test_log_samples(tmp_path):
    rows = [{"prompt": "2+2=", "response": "4", "rm_score": 1.5, "gold_reward": math.nan}]
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log_samples(10, rows)
    assert read_metrics(tmp_path / "samples.jsonl") == [
        {"step": 10, "prompt": "2+2=", "response": "4", "rm_score": 1.5, "gold_reward": None}
    ]


def test_torn_last_line_is_tolerated_and_repaired(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with (
        caplog.at_level(logging.WARNING, logger="ppo_rlhf.metrics"),
        MetricsLogger(tmp_path, tensorboard=False, console_every=0) as logger,
    ):
        logger.log(3, {"a": 3.0})
    assert "torn last line" in caplog.text
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_metrics(path)


def test_read_missing_file_is_empty(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_truncate_after_drops_later_steps(tmp_path):
    with MetricsLogger(tmp_path, console_every=0) as logger:
        for step in range(1, 6):
            logger.log(step, {"a": float(step)})
            logger.log_samples(step, [{"prompt": "p", "response": str(step)}])
    with MetricsLogger(tmp_path, console_every=0) as resumed:
        resumed.truncate_after(3)
        resumed.log(4, {"a": 40.0})
    assert [(r["step"], r["a"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    assert [r["step"] for r in read_metrics(tmp_path / "samples.jsonl")] == [1, 2, 3]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("a")] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_disabled_logger_is_a_no_op(tmp_path):
    out = tmp_path / "rank1"
    with MetricsLogger(out, enabled=False, wandb_project="p") as logger:
        logger.log(1, {"a": 1.0})
        logger.log_samples(1, [{"prompt": "p"}])
        logger.truncate_after(0)
    assert not out.exists()


def test_wandb_missing_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    monkeypatch.setattr(metrics_module, "_warned_no_wandb", False)
    with caplog.at_level(logging.WARNING, logger="ppo_rlhf.metrics"):
        for _ in range(2):
            with MetricsLogger(tmp_path, tensorboard=False, wandb_project="demo") as logger:
                logger.log(1, {"a": 1.0})
    assert caplog.text.count("wandb is not installed") == 1
    assert read_metrics(tmp_path / "metrics.jsonl")


def test_wandb_receives_metrics(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, tensorboard=False, wandb_project="demo", console_every=0) as lg:
        lg.log(5, {"a": math.nan, "b": 2.0})
    assert calls[0][0] == "init" and calls[0][1]["project"] == "demo"
    assert calls[1] == ("log", {"a": None, "b": 2.0}, 5)
    assert calls[2] == ("finish",)


def test_write_summary_replaces_atomically(tmp_path):
    write_summary(tmp_path, {"old": 1})
    path = write_summary(tmp_path, {"gold_reward": np.float64(0.5), "kl": math.inf})
    assert json.loads(path.read_text()) == {"gold_reward": 0.5, "kl": None}


def test_progress_counts(capsys):
    with Progress(4, "ppo") as bar:
        bar.update(loss=0.5)
        bar.update(3, kl=math.nan)
        assert bar.n == 4
    assert "ppo" in capsys.readouterr().err


def test_progress_is_plain_periodic_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 31.0, 40.0, 45.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    with Progress(3, "sft") as bar:  # capsys' stderr is not a terminal
        bar.update(loss=0.5)  # t=1: too soon for a line
        bar.update(loss=0.25)  # t=31: a line
        bar.update(loss=0.125)  # t=40: the last step always prints
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == ["sft 2/3 (67%) 31s elapsed, ETA 16s | loss=0.25",
                                "sft 3/3 (100%) 40s elapsed, ETA 0s | loss=0.125"]


def test_progress_is_a_tqdm_bar_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with Progress(4, "ppo") as bar:
        bar.update(2)
        assert bar._bar is not None and bar._bar.n == 2


def test_console_prints_every_evaluation_and_says_where_the_metrics_are(tmp_path, capsys):
    with MetricsLogger(tmp_path, tensorboard=False, console_every=15) as logger:
        for step in range(1, 31):
            logger.log(step, {"objective/kl": 0.1}, stage="ppo")
            if step % 25 == 0:
                logger.log(step, {"eval/gold_reward": 0.5}, stage="ppo")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[ppo] the console shows every evaluation and every 15 steps")
    assert str(tmp_path / "metrics.jsonl") in lines[0]
    assert lines[1:] == ["ppo step 15 | objective/kl 0.1", "ppo step 25 | eval/gold_reward 0.5",
                         "ppo step 30 | objective/kl 0.1"]


def test_phase_timer_accumulates():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("generate"):
            time.sleep(0.01)
    with pytest.raises(RuntimeError), timer("train"):
        raise RuntimeError
    totals = timer.totals()
    assert set(totals) == {"time/generate", "time/train"}
    assert totals["time/generate"] >= 0.02
    timer.reset()
    assert timer.totals() == {}


def test_a_long_console_line_shows_the_headline_metrics_and_counts_the_rest(tmp_path, capsys):
    values = {f"time/phase{i}": 0.5 for i in range(20)}
    values.update({"objective/kl": 1.5, "objective/score": 0.25, "train/skipped_steps": 0,
                   "sft/skipped_steps": 2})
    with MetricsLogger(tmp_path, tensorboard=False, console_every=1) as logger:
        logger.log(1, values, stage="grpo")
    line = capsys.readouterr().err.splitlines()[-1]
    assert line == ("grpo step 1 | objective/score 0.25 | objective/kl 1.5 | sft/skipped_steps 2 | "
                    "+21 more in metrics.jsonl")
    assert len(read_metrics(tmp_path / "metrics.jsonl")[0]) == 3 + len(values)  # step, time, stage + all
