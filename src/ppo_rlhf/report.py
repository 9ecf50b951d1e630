"""One self-contained HTML report per run: summary figures, training curves, samples.

    ppo-rlhf report runs/demo            # writes runs/demo/report.html

`write_report` reads what the stages left in a run directory -- `metrics.jsonl`, `samples.jsonl`
and `summary.json` in `RUN/sft`, `RUN/reward`, `RUN/ppo` (the RL stage; or a single stage directory) -- and
writes one HTML file with inline CSS and PNG plots embedded as base64 data URIs, so it can be
mailed, attached to a ticket or opened from disk with no network. Metrics files are read
leniently: a run may still be writing (torn last line) and a stage logs different keys on
different lines, with `null` for values it could not compute. A missing metric drops its plot
and leaves a note; only a directory with no metrics at all is an error.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ppo_rlhf.errors import UserError
from ppo_rlhf.fileio import atomic_write_text

STAGE_ORDER = ("sft", "reward", "rl", "dpo")
STAGE_TITLES = {"sft": "Supervised fine-tuning", "reward": "Reward model", "rl": "RL",
                "dpo": "Preference optimisation"}
_STAGE_ALIASES = {"rm": "reward", "reward_model": "reward", "rlhf": "rl", "ppo": "rl"}
REWARD_FN_PREFIX = "reward_fn/"
"""Metric namespace of the reward functions' means (one curve each in the RL section)."""
_STAGE_PREFIXES = {"sft/": "sft", "rm/": "reward", "objective/": "rl"}
_PRESET_DIR = Path(__file__).parent / "algo" / "presets"
"""The RL algorithm presets: the RL stage logs under its algorithm's name (`"stage": "grpo"`)."""

class PlotSpec(NamedTuple):
    """One small figure: its curves are (metric key, legend label); `chance` draws a dashed line."""

    title: str
    ylabel: str
    curves: list[tuple[str, str]]
    chance: float | None = None


RL_PLOTS = [
    PlotSpec("Reward-model score", "RM score",
             [("objective/rm_score", "rollout"), ("eval/rm_score", "held-out eval")]),
    PlotSpec("Gold reward", "gold reward",
             [("objective/gold_reward", "rollout"), ("eval/gold_reward", "held-out eval, sampled"),
              ("eval/gold_reward_greedy", "held-out eval, greedy")]),
    PlotSpec("KL(policy ‖ reference)", "nats", [("objective/kl", "rollout"), ("eval/kl", "held-out eval")]),
    PlotSpec("KL coefficient β", "β", [("kl_ctl/beta", "β")]),
    PlotSpec("Policy entropy", "nats / token", [("objective/entropy", "entropy")]),
    PlotSpec("Response length", "tokens", [("rollout/response_length", "length")]),
]
RL_DIAGNOSTICS = [
    PlotSpec("Approximate KL per update (k3)", "nats", [("policy/approx_kl", "approx KL")]),
    PlotSpec("Clip fraction", "fraction", [("policy/clipfrac", "policy"), ("value/clipfrac", "value")]),
    PlotSpec("Value explained variance", "explained variance", [("value/explained_variance", "EV")]),
    PlotSpec("Policy loss", "loss", [("loss/policy", "policy")]),
    PlotSpec("Value loss", "loss", [("loss/value", "value")]),
    PlotSpec("Pretraining (ptx) loss", "loss", [("loss/ptx", "ptx")]),
    PlotSpec("Throughput", "tokens / s", [("perf/tokens_per_s", "tokens/s")]),
    PlotSpec("Time per step", "seconds",
             [("time/generate", "generate"), ("time/score", "score"), ("time/train", "train")]),
]
SFT_PLOTS = [
    PlotSpec("SFT loss", "cross-entropy (nats / token)",
             [("sft/train_loss", "train"), ("sft/eval_loss", "held-out")]),
    PlotSpec("SFT held-out perplexity", "perplexity", [("sft/eval_ppl", "held-out")]),
    PlotSpec("SFT learning rate", "learning rate", [("sft/lr", "lr")]),
]
REWARD_PLOTS = [
    PlotSpec("Reward-model loss", "−log σ(r_chosen − r_rejected)",
             [("rm/train_loss", "train"), ("rm/eval_loss", "held-out")]),
    PlotSpec("Reward-model accuracy", "pairwise accuracy",
             [("rm/train_acc", "train"), ("rm/eval_acc", "held-out")], chance=0.5),
]
DPO_PLOTS = [
    PlotSpec("Preference loss", "loss", [("train/loss", "train"), ("eval/loss", "held-out pairs")]),
    PlotSpec("Implicit rewards", "reward",
             [("train/chosen_reward", "chosen (train)"), ("train/rejected_reward", "rejected (train)"),
              ("eval/chosen_reward", "chosen (held-out)"), ("eval/rejected_reward", "rejected (held-out)")]),
    PlotSpec("Implicit-reward margin", "chosen − rejected", [("train/margin", "train"), ("eval/margin", "held-out")]),
    PlotSpec("Implicit-reward accuracy", "pairwise accuracy",
             [("train/accuracy", "train"), ("eval/accuracy", "held-out")], chance=0.5),
    PlotSpec("Gold reward (held-out prompts)", "gold reward",
             [("eval/gold_reward", "sampled"), ("eval/gold_reward_greedy", "greedy")]),
    PlotSpec("KL(policy ‖ reference)", "nats", [("eval/kl", "sampled")]),
    PlotSpec("Reward-model score (held-out prompts)", "RM score",
             [("eval/rm_score", "sampled"), ("eval/rm_score_greedy", "greedy"), ("online/score", "online samples")]),
    PlotSpec("Online pairs per round", "pairs", [("online/pairs", "labelled"), ("online/ties", "ties skipped")]),
]
STAGE_PLOTS = {"sft": SFT_PLOTS, "reward": REWARD_PLOTS, "rl": RL_PLOTS, "dpo": DPO_PLOTS}
STEP_LABELS = {"sft": "SFT step", "reward": "RM step", "rl": "RL update", "dpo": "DPO step (online: round)"}

SUMMARY_LABELS = {
    "sft_gold_reward": "Gold reward after SFT (sampled)",
    "sft_gold_reward_greedy": "Gold reward after SFT (greedy)",
    "ppo_gold_reward": "Gold reward after RL (sampled)",
    "ppo_gold_reward_greedy": "Gold reward after RL (greedy)",
    "final_kl": "Final KL to reference (nats)",
    "rm_accuracy": "Reward-model held-out accuracy",
    "summary_source": "Summary",
    "duplicates": "exact duplicate records in the training file (kept: repetition is the data's "
                  "distribution, see the stage log)",
    "vocab_note": "vocabulary smaller than asked",
}
_SAMPLES_PER_STEP = 3
_MAX_TEXT_CHARS = 2000
_COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626")
_RC = {
    "font.size": 9,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.8,
    "legend.fontsize": 8,
    "legend.frameon": False,
}


@dataclass
class Stage:
    """What one stage directory holds, read leniently."""

    kind: str
    path: Path
    records: list[dict] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    summary: dict | None = None

    @property
    def algo(self) -> str:
        """The RL algorithm: the summary's `algo`, else the metrics' stage name ("ppo" for old runs)."""
        if self.summary and isinstance(self.summary.get("algo"), str):
            return self.summary["algo"]
        names = {r.get("stage") for r in self.records} & set(algorithm_presets())
        return min(names) if names else "ppo"

    @property
    def title(self) -> str:
        """The section title: "RL: GRPO" for the RL stage, the method's directory for a preference
        stage, else the stage's name."""
        if self.kind == "rl":
            return f"{STAGE_TITLES['rl']}: {self.algo.upper()}"
        if self.kind == "dpo":  # one directory per compared method
            return f"{STAGE_TITLES['dpo']}: {self.path.name}"
        return STAGE_TITLES.get(self.kind, self.kind)

    def has_reward_model(self) -> bool:
        """Whether the RL run had a reward model: its config, else an RM score in its metrics."""
        config = (self.summary or {}).get("config")
        if isinstance(config, dict) and "reward_model" in config:
            return bool(config["reward_model"])
        return any("objective/rm_score" in r for r in self.records)

    def kl_in(self) -> str:
        """Where the run put the KL ('reward' or 'loss'): its config in summary.json, else its
        algorithm preset's (a run still going has no summary; an algo.kl_in override then shows
        only once it is done)."""
        config = (self.summary or {}).get("config")
        kl_in = config.get("algo", {}).get("kl_in") if isinstance(config, dict) else None
        if kl_in in ("reward", "loss"):
            return kl_in
        preset = _PRESET_DIR / f"{self.algo}.yaml"
        if preset.is_file():
            import yaml

            algo = (yaml.safe_load(preset.read_text(encoding="utf-8")) or {}).get("algo") or {}
            if algo.get("kl_in") in ("reward", "loss"):
                return algo["kl_in"]
        return "reward"


def algorithm_presets() -> list[str]:
    """Names of the RL algorithm presets (without importing the trainer's modules)."""
    return sorted(p.stem for p in _PRESET_DIR.glob("*.yaml"))


def write_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the HTML report of a pipeline run dir (or a single stage dir); return its path.

    The default output is `run_dir/report.html`. Raises `UserError` when `run_dir` is not a
    directory or holds no metrics at all.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; fix: pass the output directory of "
                        "`ppo-rlhf pipeline` or of one stage")
    stages = find_stages(run_dir)
    if not any(stage.records for stage in stages):
        raise UserError(
            f"{run_dir}: no metrics found (looked for metrics.jsonl in {run_dir} and in its "
            f"{', '.join(STAGE_ORDER)} subdirectories); fix: pass the output directory of a run "
            "that has logged at least one step"
        )
    summary = _read_json(run_dir / "summary.json")
    if summary is None and len(stages) > 1:  # a hand-chained run: gather the stages' own summaries
        summary = summary_from_stages(stages)
    out = Path(out_path) if out_path is not None else run_dir / "report.html"
    atomic_write_text(out, render_html(run_dir, stages, summary))
    return out


def summary_from_stages(stages: Sequence[Stage]) -> dict | None:
    """The run summary's headline figures from each stage's summary.json, for a run whose stages
    were run one by one (no pipeline summary.json): gold reward after SFT and after RL, RM
    accuracy, final KL, wall time per stage."""
    out: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for stage in stages:
        s = stage.summary or {}
        if stage.kind == "sft" and _as_float(s.get("gold_reward")) is not None:
            out["sft_gold_reward"] = s["gold_reward"]
            if _as_float(s.get("gold_reward_greedy")) is not None:
                out["sft_gold_reward_greedy"] = s["gold_reward_greedy"]
        elif stage.kind == "reward" and _as_float(s.get("eval_accuracy")) is not None:
            out["rm_accuracy"] = s["eval_accuracy"]
        elif stage.kind == "rl":
            for key, name in (("gold_reward", "ppo_gold_reward"), ("gold_reward_greedy", "ppo_gold_reward_greedy"),
                              ("kl", "final_kl"), ("rm_score", "ppo_rm_score")):
                if _as_float(s.get(key)) is not None:
                    out[name] = s[key]
            out["algo"] = stage.algo
        if _as_float(s.get("seconds")) is not None:
            seconds[stage.path.name] = s["seconds"]
    if seconds:
        out["stage_seconds"] = seconds
    if not out:
        return None
    out["summary_source"] = "gathered from the stages' summary.json files (no run summary.json)"
    return out


def find_stages(run_dir: Path) -> list[Stage]:
    """The stages of `run_dir`: itself if it holds metrics.jsonl, else its stage subdirectories.

    Known stages come first in pipeline order, other subdirectories with metrics after them.
    """
    if (run_dir / "metrics.jsonl").is_file():
        return [read_stage(run_dir)]
    subdirs = [d for d in sorted(run_dir.iterdir()) if d.is_dir() and (d / "metrics.jsonl").is_file()]
    stages = [read_stage(d) for d in subdirs]
    rank = {kind: i for i, kind in enumerate(STAGE_ORDER)}
    return sorted(stages, key=lambda s: rank.get(s.kind, len(rank)))


def read_stage(stage_dir: Path) -> Stage:
    """Read metrics.jsonl, samples.jsonl and summary.json of one stage directory."""
    records, bad_lines = read_jsonl_lenient(stage_dir / "metrics.jsonl")
    samples, _ = read_jsonl_lenient(stage_dir / "samples.jsonl")
    return Stage(
        kind=stage_kind(stage_dir, records),
        path=stage_dir,
        records=[r for r in records if _as_step(r.get("step")) is not None],
        bad_lines=bad_lines,
        samples=[s for s in samples if _as_step(s.get("step")) is not None],
        summary=_read_json(stage_dir / "summary.json"),
    )


def stage_kind(stage_dir: Path, records: Sequence[dict]) -> str:
    """'sft', 'reward', 'rl' or the directory name: from the dir name, the `stage` field (the RL
    stage logs its algorithm's name) or the keys."""
    name = _STAGE_ALIASES.get(stage_dir.name, stage_dir.name)
    if name in STAGE_ORDER:
        return name
    presets = set(algorithm_presets())
    for record in records:
        stage = record.get("stage")
        if isinstance(stage, str) and stage in presets:
            return "rl"
        if isinstance(stage, str) and _STAGE_ALIASES.get(stage, stage) in STAGE_ORDER:
            return _STAGE_ALIASES.get(stage, stage)
    for record in records:
        for key in record:
            for prefix, kind in _STAGE_PREFIXES.items():
                if key.startswith(prefix):
                    return kind
    return stage_dir.name


def read_jsonl_lenient(path: Path) -> tuple[list[dict], list[int]]:
    """Objects of a JSONL file that may still be being written; also the numbers of unreadable lines.

    A missing file gives no records. Lines that are not JSON objects (a torn last line, a crash
    mid-write) are skipped and their 1-based numbers returned, so the report can say so.
    """
    if not path.is_file():
        return [], []
    records, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad.append(lineno)
    return records, bad


def series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric `key`, sorted by step; nulls, non-numbers and NaN/inf left out."""
    points = []
    for record in records:
        value = _as_float(record.get(key))
        if value is not None:
            points.append((_as_step(record["step"]), value))
    points.sort(key=lambda p: p[0])
    return [p[0] for p in points], [p[1] for p in points]


def paired_by_step(records: Iterable[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) at the steps where both metrics were logged (possibly on different lines)."""
    merged: dict[int, dict] = {}
    for record in records:
        merged.setdefault(_as_step(record["step"]), {}).update(
            {k: v for k, v in record.items() if v is not None}
        )
    xs, ys = [], []
    for step in sorted(merged):
        x, y = _as_float(merged[step].get(x_key)), _as_float(merged[step].get(y_key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing): starts at values[0]."""
    out, avg, norm = [], 0.0, 0.0
    for value in values:
        avg = weight * avg + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def smoothing_weight(values: Sequence[float]) -> float:
    """EMA weight for a curve: none for short or smooth curves (schedules, converging losses).

    A curve counts as noisy when its total variation is several times its range -- a monotone
    curve has ratio 1 -- and only noisy curves are smoothed, so schedules are drawn as logged.
    """
    if len(values) < 20:
        return 0.0
    span = max(values) - min(values)
    variation = sum(abs(b - a) for a, b in itertools.pairwise(values))
    if span == 0 or variation < 4 * span:
        return 0.0
    return 0.9 if len(values) >= 100 else 0.6


# ----------------------------------------------------------------------------------------------
# Figures


def line_plot(spec: PlotSpec, curves: list[tuple[str, list[int], list[float]]], xlabel: str) -> str:
    """The figure of `spec` for its (label, steps, values) curves, as a PNG data URI.

    Long noisy curves are drawn faintly with an exponential moving average over them; short
    curves (e.g. periodic held-out evals) get markers.
    """
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(4.6, 2.9), dpi=140, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for color, (label, steps, values) in zip(_COLORS, curves):
            weight = smoothing_weight(values)
            if weight:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, ema(values, weight), color=color, linewidth=1.8, label=label)
            else:
                marker = "o" if len(values) < 40 else None
                ax.plot(steps, values, color=color, linewidth=1.5, marker=marker, markersize=3.5, label=label)
        ax.set_title(spec.title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(spec.ylabel)
        if spec.chance is not None:
            ax.axhline(spec.chance, color="#9ca3af", linestyle="--", linewidth=0.9, label="chance")
        if len(curves) > 1 or spec.chance is not None:
            ax.legend(loc="best")
        return figure_data_uri(fig)


def overoptimisation_plot(records: Sequence[dict], rm: bool = True) -> tuple[str | None, str]:
    """Gold reward and RM score (`rm`: the run had a reward model) against √KL (Gao et al. 2022),
    as a data URI, plus a caption.

    Uses the held-out eval/* metrics when they were logged, else the per-rollout objective/*
    ones. k1 KL estimates of a batch can be slightly negative; they are clipped at 0 for the √.
    Returns (None, reason) when KL or both rewards are missing.
    """
    source = "eval" if paired_by_step(records, "eval/kl", "eval/gold_reward")[0] else "objective"
    curves = []
    rewards = (("gold_reward", "gold reward"), ("rm_score", "RM score")) if rm else (("gold_reward", "gold reward"),)
    for name, label in rewards:
        kls, rewards = paired_by_step(records, f"{source}/kl", f"{source}/{name}")
        if kls:
            curves.append((label, [math.sqrt(max(kl, 0.0)) for kl in kls], rewards))
    if not curves:
        return None, f"needs {source}/kl with {source}/gold_reward" + (f" or {source}/rm_score" if rm else "")
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(6.4, 3.6), dpi=140, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        axes = [ax, ax.twinx()] if len(curves) == 2 else [ax]
        if len(axes) == 2:
            axes[1].spines["right"].set_visible(True)
            axes[1].grid(False)
        handles = []
        for axis, color, (label, xs, ys) in zip(axes, _COLORS, curves):
            weight = smoothing_weight(ys)
            if weight:
                axis.scatter(xs, ys, color=color, s=6, alpha=0.25, linewidths=0)
                handles += axis.plot(ema(xs, weight), ema(ys, weight), color=color, linewidth=1.8, label=label)
            else:
                marker = "o" if len(ys) < 40 else None
                handles += axis.plot(xs, ys, color=color, linewidth=1.5, marker=marker, markersize=3.5,
                                     label=label)
            axis.set_ylabel(label, color=color)
        ax.set_title(f"Over-optimisation: reward vs √KL ({source}/*)")
        ax.set_xlabel("√KL(policy ‖ reference)   [√nats]")
        ax.legend(handles=handles, loc="best")
        origin = "held-out evaluation" if source == "eval" else "per-rollout values, no eval/* metrics logged"
        caption = (
            f"From {source}/kl, {source}/gold_reward and {source}/rm_score ({origin}). Gold reward rising "
            "with the RM score means the policy really improves; gold reward falling while the RM score "
            "still rises is reward over-optimisation."
        ) if rm else f"From {source}/kl and {source}/gold_reward ({origin}); the run had no reward model."
        return figure_data_uri(fig), caption


def figure_data_uri(fig: Figure) -> str:
    """Render a matplotlib figure with Agg to a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------
# HTML


def render_html(run_dir: Path, stages: list[Stage], summary: dict | None) -> str:
    """The whole report page as one string.

    After the summary comes the RL stage -- what the run is for -- with its over-optimisation plot
    and the samples, then the earlier stages in pipeline order.
    """
    sections = [_summary_section(run_dir, stages, summary)]
    nav = [("summary", "Summary")]
    compare = _read_json(run_dir / "compare.json")
    if compare and isinstance(compare.get("results"), dict):
        nav.append(("compare", "Comparison"))
        sections.append(_compare_section(compare))
    with_metrics = [s for s in stages if s.records]
    for stage in [s for s in with_metrics if s.kind == "rl"]:
        nav += [("stage-rl", stage.title), ("overopt", "Over-optimisation")]
        sections += [_stage_section(stage, "stage-rl"), _overopt_section(stage)]
    sample_stages = [s for s in stages if s.samples]
    if sample_stages:
        nav.append(("samples", "Samples"))
        sections.append(_samples_section(sample_stages))
    for stage in [s for s in with_metrics if s.kind != "rl"]:
        anchor = f"stage-{stage.path.name}" if stage.kind == "dpo" else f"stage-{stage.kind}"
        nav.append((anchor, stage.title))
        sections.append(_stage_section(stage, anchor))
    nav_html = " ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in nav)
    title = f"ppo-rlhf report — {run_dir.resolve().name}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_esc(title)}</h1>
<p class="meta"><code>{_esc(str(run_dir))}</code> · generated {_esc(generated)}</p>
<nav>{nav_html}</nav>
</header>
<main>
{"".join(sections)}
</main>
</body>
</html>
"""


def _summary_section(run_dir: Path, stages: list[Stage], summary: dict | None) -> str:
    if summary is None and len(stages) == 1 and stages[0].summary is not None:
        summary = stages[0].summary
    parts = ['<section id="summary"><h2>Summary</h2>']
    if summary:
        parts.append(_summary_cards(summary))
        rest = {k: v for k, v in summary.items() if k not in _CARD_KEYS and k != "config"}
        if rest:
            parts.append(_kv_table(_flatten_summary(rest)))
        if isinstance(summary.get("config"), dict):
            parts.append(_config_tables(summary["config"]))
    else:
        parts.append(f'<p class="note">No summary.json in <code>{_esc(str(run_dir))}</code>; '
                     "the figures below come from the metrics files.</p>")
    rows = []
    for stage in stages:
        steps = [_as_step(r["step"]) for r in stage.records]
        span = f"{min(steps)} – {max(steps)}" if steps else "—"
        where = stage.path.relative_to(run_dir) if stage.path != run_dir else Path(".")
        rows.append(
            f"<tr><td>{_esc(stage.title)}</td>"
            f"<td><code>{_esc(str(where))}/</code></td><td class=num>{len(stage.records)}</td>"
            f"<td class=num>{span}</td><td class=num>{len(stage.samples)}</td></tr>"
        )
    parts.append(
        '<table class="grid"><thead><tr><th>stage</th><th>directory</th><th>metric lines</th>'
        f"<th>steps</th><th>samples</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    parts.append("</section>")
    return "".join(parts)


_CARD_KEYS = ("sft_gold_reward", "ppo_gold_reward", "sft_gold_reward_greedy", "ppo_gold_reward_greedy",
              "rm_accuracy", "final_kl", "stage_seconds")


def _summary_cards(summary: dict) -> str:
    """Headline figures as cards: gold reward SFT → RL (sampled and greedy), RM accuracy, final
    KL, wall time."""
    cards = []
    algo = str(summary.get("algo") or "RL").upper()
    temperature = _as_float(summary.get("eval_temperature"))
    sampled = f"sampled, T={temperature:g}" if temperature is not None else "sampled"
    for kind, how in (("", sampled), ("_greedy", "greedy")):
        sft, rl = _as_float(summary.get(f"sft_gold_reward{kind}")), _as_float(summary.get(f"ppo_gold_reward{kind}"))
        if rl is not None:
            value = f"{_fmt(sft)} → {_fmt(rl)}" if sft is not None else _fmt(rl)
            delta = f"{rl - sft:+.4g} from {algo}" if sft is not None else f"after {algo}"
            cards.append((f"Gold reward ({how})", value, delta))
    acc = _as_float(summary.get("rm_accuracy"))
    if acc is not None:
        cards.append(("RM held-out accuracy", f"{acc:.1%}", "pairwise, chance = 50%"))
    kl = _as_float(summary.get("final_kl"))
    if kl is not None:
        cards.append(("Final KL", f"{_fmt(kl)} nats", f"√KL = {math.sqrt(max(kl, 0.0)):.3g}"))
    seconds = summary.get("stage_seconds")
    if isinstance(seconds, dict):
        total = sum(v for v in (_as_float(s) for s in seconds.values()) if v is not None)
        cards.append(("Wall time", _fmt_duration(total), " · ".join(
            f"{k} {_fmt_duration(_as_float(v) or 0.0)}" for k, v in seconds.items())))
    if not cards:
        return ""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{_esc(label)}</div><div class="value">{_esc(value)}</div>'
        f'<div class="sub">{_esc(sub)}</div></div>'
        for label, value, sub in cards
    ) + "</div>"


def _config_tables(config: dict) -> str:
    """A config (a pipeline's: one mapping per stage) as collapsible tables of dotted keys."""
    groups = {k: v for k, v in config.items() if isinstance(v, dict) and k in _PIPELINE_STAGES}
    top = {k: v for k, v in config.items() if k not in groups}
    parts = []
    for name, values in ([("run", top)] if top else []) + list(groups.items()):
        rows = [(key, _fmt_value(value)) for key, value in _dotted(values)]
        parts.append(f"<details><summary>config: {_esc(name)} ({len(rows)} options)</summary>"
                     + _kv_table(rows) + "</details>")
    return "".join(parts)


_PIPELINE_STAGES = ("tokenizer", "data", "sft", "reward", "ppo", "eval")


def _dotted(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def _flatten_summary(summary: dict) -> list[tuple[str, str]]:
    """(label, formatted value) rows; one level of nesting flattened, durations humanised; a
    config is left to `_config_tables`."""
    rows = []
    for key, value in summary.items():
        if key == "config":
            continue
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                if key == "stage_seconds" and _as_float(sub_value) is not None:
                    rows.append((f"time: {sub}", _fmt_duration(_as_float(sub_value))))
                else:
                    rows.append((f"{key}.{sub}", _fmt_value(sub_value)))
        else:
            rows.append((SUMMARY_LABELS.get(key, key), _fmt_value(value)))
    return rows


def _compare_section(compare: dict) -> str:
    """RUN/compare.json as a table: each method's held-out gold reward (greedy and sampled), RM
    score, KL to the SFT model and wall time."""
    head = ("method", "gold (greedy)", "gold (sampled)", "RM score (sampled)", "KL (sampled, nats)", "wall time")
    rows = []
    results = compare["results"]
    for name in [m for m in compare.get("methods", []) if m in results] or sorted(results):
        r = results[name]
        secs = _as_float(r.get("seconds"))
        cells = [_fmt(_as_float(r.get(k))) for k in ("gold_reward_greedy", "gold_reward", "rm_score", "kl")]
        rows.append(f"<tr><td>{_esc(name)}</td>" + "".join(f"<td class=num>{c}</td>" for c in cells)
                    + f"<td class=num>{_esc(_fmt_duration(secs)) if secs is not None else '—'}</td></tr>")
    note = (f"{_esc(str(compare.get('eval_prompts', '')))} held-out prompt samples; sampled at T = "
            f"{_esc(str(compare.get('temperature', '')))}; KL to the SFT model; every method from the same "
            "SFT model and reward model.")
    return ('<section id="compare"><h2>Comparison</h2><table class="grid"><thead><tr>'
            + "".join(f"<th>{h}</th>" for h in head) + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f'<p class="note">{note}</p></section>')


def _stage_section(stage: Stage, anchor: str) -> str:
    title = stage.title
    parts = [f'<section id="{anchor}"><h2>{_esc(title)}</h2>']
    if stage.bad_lines:
        shown = ", ".join(str(n) for n in stage.bad_lines[:10]) + (" …" if len(stage.bad_lines) > 10 else "")
        parts.append(f'<p class="note">{len(stage.bad_lines)} unreadable line(s) of '
                     f"<code>{_esc(str(stage.path / 'metrics.jsonl'))}</code> skipped (line {_esc(shown)}); "
                     "a torn last line is normal while a run is still writing.</p>")
    if stage.kind == "reward":
        steps, accs = series(stage.records, "rm/eval_acc")
        if accs:
            parts.append(f'<p class="headline">Held-out accuracy: <b>{accs[-1]:.1%}</b> '
                         f"at step {steps[-1]} (best {max(accs):.1%})</p>")
    if stage.summary and stage.kind in STAGE_ORDER:
        parts.append("<details><summary>stage summary.json</summary>"
                     + _kv_table(_flatten_summary(stage.summary)) + "</details>")
        if isinstance(stage.summary.get("config"), dict):
            parts.append(_config_tables(stage.summary["config"]))
    xlabel = STEP_LABELS.get(stage.kind, "step")
    plots = STAGE_PLOTS.get(stage.kind) or _generic_plots(stage.records)
    if stage.kind == "rl":
        if not stage.has_reward_model():
            plots = [p for p in plots if not p.curves[0][0].endswith("rm_score")]
        plots = [_reward_plot(stage)] + plots + _reward_function_plots(stage.records)
    parts.append(_plot_grid(stage.records, plots, xlabel))
    if stage.kind == "rl":
        parts.append(f"<h3>{_esc(stage.algo.upper())} diagnostics</h3>")
        parts.append(_plot_grid(stage.records, RL_DIAGNOSTICS, xlabel))
    parts.append("</section>")
    return "".join(parts)


def _plot_grid(records: list[dict], plots: list[PlotSpec], xlabel: str) -> str:
    figures, missing, smoothed = [], [], False
    for spec in plots:
        curves = []
        for key, label in spec.curves:
            steps, values = series(records, key)
            if values:
                curves.append((label, steps, values))
            else:
                missing.append(key)
        if curves:
            uri = line_plot(spec, curves, xlabel)
            figures.append(f'<figure><img src="{uri}" alt="{_esc(spec.title)}"></figure>')
            smoothed = smoothed or any(smoothing_weight(values) for _, _, values in curves)
    parts = []
    if figures:
        parts.append('<div class="plots">' + "".join(figures) + "</div>")
    if smoothed:
        parts.append('<p class="hint">Noisy curves: faint line = value per step, solid line = exponential '
                     "moving average.</p>")
    if missing:
        parts.append('<p class="note">Not plotted (not in metrics.jsonl): '
                     + ", ".join(f"<code>{_esc(k)}</code>" for k in missing) + "</p>")
    return "".join(parts)


def _reward_plot(stage: Stage) -> PlotSpec:
    """The per-rollout reward the policy was trained on (`objective/rlhf_reward`), titled by its
    sources -- the RM score (logged only with a reward model) and the reward functions -- and by
    where the KL went: in the reward (score − β·KL) or in the loss (the reward is the score)."""
    sources = ["RM score"] if stage.has_reward_model() else []
    sources += sorted({k[len(REWARD_FN_PREFIX):] for r in stage.records for k in r if k.startswith(REWARD_FN_PREFIX)})
    score = " + ".join(sources) or "score"
    if len(sources) > 1:
        score = f"({score})"
    if stage.kl_in() == "reward":
        return PlotSpec(f"Reward: {score} − β·KL", "reward per sequence", [("objective/rlhf_reward", "rollout")])
    return PlotSpec(f"Reward: {score} (KL in the loss)", "reward per sequence", [("objective/rlhf_reward", "rollout")])


def _reward_function_plots(records: list[dict]) -> list[PlotSpec]:
    """One plot of every reward function's mean (`reward_fn/<name>`), when the run had any."""
    keys = sorted({k for r in records for k in r if k.startswith(REWARD_FN_PREFIX)})
    if not keys:
        return []
    return [PlotSpec("Reward functions (mean per rollout)", "reward",
                     [(k, k[len(REWARD_FN_PREFIX):]) for k in keys])]


def _generic_plots(records: list[dict]) -> list[PlotSpec]:
    """One plot per numeric metric, for a stage this report has no layout for."""
    keys = sorted({k for r in records for k, v in r.items()
                   if k not in ("step", "time") and _as_float(v) is not None})
    return [PlotSpec(key, key.rsplit("/", 1)[-1], [(key, key)]) for key in keys]


def _overopt_section(stage: Stage) -> str:
    uri, caption = overoptimisation_plot(stage.records, rm=stage.has_reward_model())
    parts = ['<section id="overopt"><h2>Over-optimisation</h2>']
    if uri is None:
        parts.append(f'<p class="note">Not plotted: {_esc(caption)}.</p>')
    else:
        parts.append(f'<figure class="wide"><img src="{uri}" alt="Over-optimisation: reward vs sqrt KL">'
                     f"<figcaption>{_esc(caption)}</figcaption></figure>")
    parts.append("</section>")
    return "".join(parts)


def pick_sample_steps(samples: Sequence[dict]) -> list[int]:
    """The first, middle and last distinct steps of the samples (fewer if there are fewer)."""
    steps = sorted({_as_step(s["step"]) for s in samples})
    if not steps:
        return []
    picks = [steps[0], steps[len(steps) // 2], steps[-1]]
    return sorted(set(picks))


def _samples_section(stages: list[Stage]) -> str:
    parts = ['<section id="samples"><h2>Samples</h2>']
    for stage in stages:
        parts.append(f"<h3>{_esc(stage.title)} — first, middle and last logged steps</h3>")
        rows = []
        for step in pick_sample_steps(stage.samples):
            at_step = [s for s in stage.samples if _as_step(s["step"]) == step][:_SAMPLES_PER_STEP]
            for i, sample in enumerate(at_step):
                step_cell = f'<td class="num step" rowspan="{len(at_step)}">{step}</td>' if i == 0 else ""
                rows.append(
                    f"<tr>{step_cell}"
                    f"<td class=txt><div class=text>{_esc(_clip(sample.get('prompt')))}</div></td>"
                    f"<td class=txt><div class=text>{_esc(_clip(sample.get('response')))}</div></td>"
                    f"<td class=num>{_esc(_fmt(_as_float(sample.get('rm_score'))))}</td>"
                    f"<td class=num>{_esc(_fmt(_as_float(sample.get('gold_reward'))))}</td></tr>"
                )
        parts.append(
            '<table class="grid samples"><thead><tr><th>step</th><th>prompt</th><th>response</th>'
            f"<th>RM score</th><th>gold reward</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    parts.append("</section>")
    return "".join(parts)


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td class=num>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


# ----------------------------------------------------------------------------------------------
# Small helpers


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or unreadable (a report never fails on it)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _as_step(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _fmt_value(value: Any) -> str:
    number = _as_float(value)
    if number is not None and not isinstance(value, int):
        return _fmt(number)
    if isinstance(value, (list, dict)):
        return _clip(json.dumps(value), 200)
    return "—" if value is None else str(value)


def _fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _clip(text: Any, limit: int = _MAX_TEXT_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit} more characters]"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


_CSS = """
:root { --fg: #111827; --muted: #6b7280; --line: #e5e7eb; --bg: #f9fafb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 18px 32px 10px; position: sticky;
         top: 0; z-index: 1; }
h1 { font-size: 20px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 0 0 12px; }
h3 { font-size: 14px; margin: 20px 0 8px; color: #374151; }
.meta { color: var(--muted); margin: 0 0 8px; font-size: 12px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; font-size: 13px; }
nav a:hover { text-decoration: underline; }
main { padding: 20px 32px 48px; max-width: 1480px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 20px;
          margin-bottom: 20px; scroll-margin-top: 96px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: #374151; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 16px; }
.card { flex: 1 1 200px; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
        background: var(--bg); }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; margin: 2px 0; }
.card .sub { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0 4px; }
table.kv th { text-align: left; font-weight: 500; color: #374151; padding: 3px 24px 3px 0; }
table.kv td { padding: 3px 0; }
table.grid { width: 100%; font-size: 13px; }
table.grid th { white-space: nowrap; text-align: left; color: var(--muted); font-weight: 600;
                border-bottom: 2px solid var(--line); padding: 6px 10px; }
table.grid td { border-bottom: 1px solid var(--line); padding: 6px 10px; vertical-align: top; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.step { font-weight: 600; }
table.samples td.txt { width: 40%; }
.text { white-space: pre-wrap; word-break: break-word; max-height: 16em; overflow: auto;
        font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figure.wide { max-width: 760px; }
figcaption { color: var(--muted); font-size: 12.5px; padding: 6px 4px 2px; }
.note { color: #92400e; background: #fffbeb; border: 1px solid #fde68a; border-radius: 6px; padding: 6px 10px;
        font-size: 12.5px; }
.hint { color: var(--muted); font-size: 12px; margin: 6px 0 0; }
.headline { font-size: 15px; margin: 0 0 10px; }
details { margin: 0 0 10px; font-size: 13px; }
summary { cursor: pointer; color: var(--muted); }
"""
