"""One metrics logger for every stage: JSONL + TensorBoard (+ W&B), console lines, progress bars.

    with MetricsLogger(run_dir, enabled=is_rank0) as metrics:
        metrics.log(step, {"loss/policy": 0.12, "objective/kl": 1.3}, stage="ppo")
        metrics.log_samples(step, [{"prompt": p, "response": r, "rm_score": s, "gold_reward": g}])

`run_dir/metrics.jsonl` holds one object per line, `{"step", "time", "stage", **metrics}`, with
non-finite values written as `null` (strict JSON). `read_metrics` reads it back and tolerates the
torn last line a killed process can leave; `truncate_after(step)` drops the lines a resumed run is
about to write again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ppo_rlhf.errors import UserError
from ppo_rlhf.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
_RESERVED = ("step", "time", "stage")
EVAL_PREFIX = "eval/"
"""Metrics of an evaluation: always printed to the console."""
CONSOLE_METRICS = (
    "sft/train_loss", "rm/train_loss", "rm/train_acc",
    "objective/score", "objective/rm_score", "objective/gold_reward", "objective/kl", "kl_ctl/beta",
    "policy/approx_kl", "policy/clipfrac", "value/explained_variance", "perf/seconds_per_update",
)
"""What a long console line shows (in this order), beside evaluations, the data report (`data/`)
and skipped steps when there are any; the rest is counted and left to metrics.jsonl."""
CONSOLE_MAX = 6
"""A line with at most this many metrics is printed whole."""
_FSYNC_EVERY_S = 1.0
_warned_no_wandb = False


def jsonable(value: Any) -> Any:
    """`value` with tensors/numpy scalars as python numbers and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL metrics/samples file; a torn (unparsable) last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    # errors="replace": a torn last line may end inside a multi-byte character.
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise TypeError("expected a JSON object")
        except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            if lineno == len(lines):  # no newline after it: the write was cut short
                break
            raise UserError(
                f"{path}:{lineno}: not a JSON object ({exc}); fix: delete or repair that line"
            ) from exc
        records.append(record)
    return records


class MetricsLogger:
    """Appends metrics to `out_dir/metrics.jsonl`, TensorBoard (`out_dir/tb`) and optionally W&B.

    `enabled=False` (non-zero DDP ranks) makes every method a no-op and creates no files.
    `console_every=N` prints every N-th step's metrics to stderr, and every line that holds
    `eval/` metrics (0: never); the first printed line says where the full metrics are.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        console_every: int = 1,
    ):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.console_every = console_every
        self._files: dict[str, Any] = {}
        self._last_fsync = time.monotonic()
        self._use_tensorboard = tensorboard
        self._tb = None  # created at the first log(): no empty event file, no import if unused
        self._tb_purge_step: int | None = None
        self._wandb = None
        self._told_where = False
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, SAMPLES_FILE):
            _drop_torn_tail(self.out_dir / name)
        if wandb_project is not None:
            self._wandb = _wandb_run(wandb_project, self.out_dir)

    def log(self, step: int, metrics: dict[str, float], *, stage: str | None = None) -> None:
        """Record `metrics` (numbers, 0-d tensors, numpy scalars; None = not available)."""
        if not self.enabled:
            return
        for key in _RESERVED:
            if key in metrics:
                raise ValueError(f"metric name {key!r} is reserved; use a namespaced name")
        values = {k: _number(k, v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), "stage": stage, **values}
        self._append(METRICS_FILE, record)
        if self._use_tensorboard:
            if self._tb is None:
                self._tb = _summary_writer(self.out_dir / "tb", self._tb_purge_step)
                self._tb_purge_step = None  # purge once; a later writer would hide new events
            for key, value in values.items():
                if value is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(jsonable(values), step=step)
        # Every evaluation is printed; training lines every console_every-th step.
        is_eval = any(k.startswith(EVAL_PREFIX) for k in values)
        if self.console_every and (step % self.console_every == 0 or is_eval):
            if not self._told_where:
                tqdm.write(self.where_line(stage), file=sys.stderr)
                self._told_where = True
            tqdm.write(_console_line(step, stage, values), file=sys.stderr)

    def where_line(self, stage: str | None = None) -> str:
        """The console line that says where the full metrics are."""
        tb = f"; TensorBoard: tensorboard --logdir {self.out_dir / 'tb'}" if self._use_tensorboard else ""
        every = "every step" if self.console_every == 1 else f"every {self.console_every} steps"
        return (f"[{stage or 'metrics'}] the console shows every evaluation and {every}; every "
                f"metric of every step is in "
                f"{self.out_dir / METRICS_FILE}{tb}; `ppo-rlhf report` plots them")

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Append generated samples (`prompt`, `response`, `rm_score`, ...) at `step`."""
        if not self.enabled:
            return
        for row in rows:
            self._append(SAMPLES_FILE, {"step": step, **row}, sync=False)
        self._sync()

    def truncate_after(self, step: int) -> None:
        """Drop logged lines with a step > `step`, so a resumed run does not log them twice."""
        if not self.enabled:
            return
        self._close_files()
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = self.out_dir / name
            if path.exists():
                kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
                atomic_write_text(path, "".join(_json_line(r) for r in kept))
        # The next writer's purge_step hides the previous attempt's events from this step on.
        self._tb_purge_step = step + 1
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def close(self) -> None:
        if not self.enabled:
            return
        self._close_files()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _append(self, name: str, record: dict[str, Any], *, sync: bool = True) -> None:
        if name not in self._files:
            # Kept open across calls (closed in close/truncate_after), hence no `with`.
            self._files[name] = open(self.out_dir / name, "a", encoding="utf-8")  # noqa: SIM115
        self._files[name].write(_json_line(record))
        if sync:
            self._sync()

    def _sync(self) -> None:
        """Flush every line (a killed process keeps it); fsync at most once a second."""
        for f in self._files.values():
            f.flush()
        now = time.monotonic()
        if now - self._last_fsync >= _FSYNC_EVERY_S:
            for f in self._files.values():
                os.fsync(f.fileno())
            self._last_fsync = now

    def _close_files(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files.clear()


def _number(key: str, value: Any) -> float | int | None:
    """A python number (bool -> 0/1) from a number, 0-d tensor or numpy scalar; None passes."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if value is not None and not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} must be a number or None, got {type(value).__name__}")
    return value


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(jsonable(record), allow_nan=False, ensure_ascii=False) + "\n"


def _console_line(step: int, stage: str | None, values: dict[str, float | int | None]) -> str:
    """`stage step N | key value | ...`: every metric of a short line; of a long one the
    `CONSOLE_METRICS` and the count of the others, which are in metrics.jsonl."""
    shown = values
    if len(values) > CONSOLE_MAX:
        shown = {k: values[k] for k in CONSOLE_METRICS if k in values}
        shown.update({k: v for k, v in values.items() if k.startswith((EVAL_PREFIX, "data/"))
                      or (k.endswith("skipped_steps") and v)})
    parts = [f"{stage} step {step}" if stage else f"step {step}"]
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()]
    if len(shown) < len(values):
        parts.append(f"+{len(values) - len(shown)} more in {METRICS_FILE}")
    return " | ".join(parts)


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a killed writer) so appended lines stay parsable."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data[: data.rfind(b"\n") + 1]
    log.warning("%s: dropping a torn last line left by an interrupted run", path)
    atomic_write_text(path, keep.decode("utf-8", errors="replace"))


def _summary_writer(log_dir: Path, purge_step: int | None = None):
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: slow, so lazily

    return SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=30)


def _wandb_run(project: str, out_dir: Path):
    """A W&B run for `project`, or None (with one warning per process) if wandb is missing."""
    global _warned_no_wandb
    try:
        import wandb
    except ImportError:
        if not _warned_no_wandb:
            log.warning(
                "wandb_project=%r is set but wandb is not installed; logging to JSONL and "
                "TensorBoard only (fix: pip install wandb)",
                project,
            )
            _warned_no_wandb = True
        return None
    return wandb.init(project=project, dir=str(out_dir), name=out_dir.name)


def write_summary(out_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Replace `out_dir/summary.json` atomically (non-finite values -> null); returns its path."""
    path = Path(out_dir) / SUMMARY_FILE
    atomic_write_json(path, jsonable(summary))
    return path


class Progress:
    """Progress on stderr with ETA: a tqdm bar on a terminal; plain lines otherwise.

    With stderr redirected to a file (a log, CI) a bar's `\r` redraws clutter it, so the progress
    is printed as one plain line at most every `every_s` seconds, and at the end.
    """

    def __init__(self, total: int | None, desc: str, *, enabled: bool = True, every_s: float = 30.0):
        self._plain = not sys.stderr.isatty()
        self._bar = None
        self.n, self.total, self.desc, self.enabled, self.every_s = 0, total, desc, enabled, every_s
        self._postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        if not self._plain:
            self._bar = tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.2)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self._postfix = jsonable(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.every_s or self.n == self.total):
            self._last = now
            print(self.line(now - self._start), file=sys.stderr, flush=True)

    def line(self, elapsed: float) -> str:
        """`desc 30/120 (25%) 12s elapsed, ETA 36s | kl=0.1` (the plain-text progress line)."""
        if self.total:
            eta = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
            head = (f"{self.desc} {self.n}/{self.total} ({self.n / self.total:.0%}) "
                    f"{_seconds(elapsed)} elapsed, ETA {_seconds(eta)}")
        else:
            head = f"{self.desc} {self.n} {_seconds(elapsed)} elapsed"
        post = ", ".join(f"{k}={v}" for k, v in self._postfix.items())
        return head + (f" | {post}" if post else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


class PhaseTimer:
    """Accumulates wall time per phase: `with timer("generate"): ...`; `totals()` -> time/<phase>.

    CUDA kernels run asynchronously: synchronize inside the block when a phase must include them.
    """

    def __init__(self):
        self._totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._totals[phase] = self._totals.get(phase, 0.0) + elapsed

    def totals(self) -> dict[str, float]:
        return {f"time/{phase}": seconds for phase, seconds in self._totals.items()}

    def reset(self) -> None:
        self._totals.clear()
