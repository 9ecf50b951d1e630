"""Where our PPO update spends its time: torch.profiler op table and py-spy Python stacks.

    python benchmarks/profile_ppo.py --layers 2 --d 64 --batch 32 --prompt 16 --response 64
    python benchmarks/profile_ppo.py --layers 4 --d 256 --batch 32 --prompt 16 --response 64 --py-spy

Same fixtures and PPOConfig as benchmarks/ppo_vs_trl.py (ours side). After one warm-up update it
profiles `--updates` updates with torch.profiler (phases appear as the record_function ranges
`phase/generate`, `phase/score`, `phase/train`) and prints: wall time per phase, the top aten ops by
self CPU time, and the share of time in matmul/attention kernels (the "arithmetic") against
everything else. With --py-spy (needs the `py-spy` binary, e.g. in the TRL virtualenv) it then
re-runs the same updates under `py-spy record` (no torch.profiler) and prints the hottest functions
of ppo_rlhf, torch and transformers by inclusive samples. Everything printed is also written to
benchmarks/results/profile_<config>.txt.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

ARITHMETIC_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                  "aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_efficient_attention",
                  "aten::_flash_attention", "aten::_scaled_mm", "mkldnn::_linear_pointwise")


def build_trainer(case: bc.Case, work_dir: Path, updates: int, threads: int):
    import ours_worker
    import torch

    from ppo_rlhf.stages import common
    from ppo_rlhf.stages.rl import RLTrainer

    torch.set_num_threads(threads)
    paths = bc.prepare(case, work_dir)
    cfg = ours_worker.make_config(case, paths, updates, threads, out_dir=tempfile.mkdtemp(prefix="ppo-prof-"))
    trainer = RLTrainer(cfg, common.setup(cfg.run))
    return trainer, itertools.count(1)


class ProfiledTimer:
    """The trainer's PhaseTimer plus a torch.profiler range per phase."""

    def __init__(self):
        from ppo_rlhf.metrics import PhaseTimer

        self.inner = PhaseTimer()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        import torch

        with self.inner(phase), torch.profiler.record_function(f"phase/{phase}"):
            yield

    def totals(self):
        return self.inner.totals()

    def reset(self):
        self.inner.reset()


def run_updates(trainer, steps, n: int, timer) -> list[float]:
    """n more RL iterations (`steps` counts them) with `timer` as the trainer's phase timer."""
    from ppo_rlhf.guards import NonFiniteGuard
    from ppo_rlhf.stages.loop import StepContext

    trainer.timer = timer
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trainer.step(StepContext(next(steps), NonFiniteGuard(5), None))
        times.append(time.perf_counter() - t0)
    return times


def torch_profile(case: bc.Case, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    trainer, steps = build_trainer(case, Path(args.work_dir), args.updates, args.threads)
    timer = ProfiledTimer()
    run_updates(trainer, steps, 1, timer)  # warm-up
    timer.reset()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        times = run_updates(trainer, steps, args.updates, timer)
    out = io.StringIO()
    total = sum(times)
    phases = {k.split("/", 1)[1]: v for k, v in timer.totals().items()}
    print(f"# {case.label}: {args.updates} profiled updates, {total / args.updates:.3f} s/update "
          f"(torch.profiler adds overhead), {args.threads} threads, load {os.getloadavg()[0]:.1f}", file=out)
    for k, v in phases.items():
        print(f"  {k:<9} {v / args.updates:.3f} s/update ({100 * v / total:.0f}%)", file=out)
    print(f"  other     {(total - sum(phases.values())) / args.updates:.3f} s/update", file=out)
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    arith = sum(e.self_cpu_time_total for e in events if e.key.startswith(ARITHMETIC_OPS)) / 1e6
    n_calls = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"  matmul/attention kernels: {arith / args.updates:.3f} s/update = {100 * arith / total:.0f}% of wall; "
          f"{n_calls / args.updates:,.0f} aten op calls per update "
          f"({1e6 * (total - arith) / max(1, n_calls):.1f} us of non-matmul wall per call)", file=out)
    print(f"  (profiler self-time sum {self_total / args.updates:.3f} s/update)\n", file=out)
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top), file=out)
    # The same per phase: which ops each phase's time goes to.
    for phase in phases:
        print(f"\n## ops under phase/{phase} (inclusive CPU time, top {args.top // 2})", file=out)
        rows = collections.Counter()
        counts = collections.Counter()
        for ev in prof.events():
            if ev.name.startswith("aten::") and _under(ev, f"phase/{phase}"):
                rows[ev.name] += ev.self_cpu_time_total
                counts[ev.name] += 1
        for name, us in rows.most_common(args.top // 2):
            per_update = us / 1e6 / args.updates
            print(f"  {name:<40} {per_update:8.4f} s/update  {counts[name] / args.updates:8.0f} calls/update",
                  file=out)
    return out.getvalue()


def _under(ev, name: str) -> bool:
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def py_spy_profile(case: bc.Case, args) -> str:
    spy = shutil.which("py-spy") or "/work/trl-venv/bin/py-spy"
    if not Path(spy).is_file():
        return "py-spy not found: pip install py-spy (e.g. into the TRL virtualenv)\n"
    raw = Path(tempfile.mkdtemp(prefix="pyspy-")) / "stacks.txt"
    cmd = [spy, "record", "--rate", "250", "--format", "raw", "--output", str(raw), "--",
           sys.executable, __file__, "--child", json.dumps(case.to_json()), "--updates", str(args.updates),
           "--threads", str(args.threads), "--work-dir", args.work_dir]
    subprocess.run(cmd, check=True, capture_output=True)
    inclusive, leaf = collections.Counter(), collections.Counter()
    total = 0
    in_measure = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        frames = stack.split(";")
        if not any("measured_updates" in f for f in frames):
            continue  # imports, model loading and the warm-up update
        in_measure += n
        seen = set()
        for f in frames:
            name = _frame_name(f)
            if name and name not in seen:
                inclusive[name] += n
                seen.add(name)
        leaf[_frame_name(frames[-1]) or frames[-1]] += n
        total += n
    out = io.StringIO()
    print(f"# py-spy: {in_measure} samples at 250 Hz over {args.updates} updates of {case.label} "
          "(inclusive share of the measured updates)", file=out)
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / max(1, total):5.1f}%  {name}", file=out)
    print("\n# leaf functions (self share)", file=out)
    for name, n in leaf.most_common(args.top // 2):
        print(f"  {100 * n / max(1, total):5.1f}%  {name}", file=out)
    return out.getvalue()


def _frame_name(frame: str) -> str | None:
    """'func (path/to/file.py:12)' -> 'module/file.py:func' for ppo_rlhf/torch/transformers frames."""
    func, _, where = frame.partition(" (")
    path = where.split(":")[0]
    for root in ("ppo_rlhf/", "transformers/", "torch/", "benchmarks/"):
        if root in path:
            return f"{root}{path.split(root, 1)[1]}:{func}"
    return None


def child(case_json: str, args) -> None:
    """The process py-spy samples: warm-up, then the measured updates in a named function."""
    case = bc.Case.from_json(json.loads(case_json))
    trainer, steps = build_trainer(case, Path(args.work_dir), args.updates, args.threads)
    from ppo_rlhf.metrics import PhaseTimer

    timer = PhaseTimer()
    run_updates(trainer, steps, 1, timer)

    def measured_updates():
        return run_updates(trainer, steps, args.updates, timer)

    measured_updates()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="bf16: run.dtype=bfloat16 (autocast, fp32 master weights)")
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--py-spy", action="store_true", help="also sample Python stacks with py-spy")
    ap.add_argument("--work-dir", default="/tmp/ppo_vs_trl_work")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # Before torch starts OpenMP: the same threading environment as ppo_vs_trl.py's workers.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.child:
        child(args.child, args)
        return 0
    case = bc.Case(bc.ModelShape(args.layers, args.d), args.batch, args.prompt, args.response,
                   precision=args.precision)
    text = torch_profile(case, args)
    if args.py_spy:
        text += "\n" + py_spy_profile(case, args)
    print(text)
    out = HERE / "results" / f"profile_{case.label.replace(' ', '_').replace('=', '').replace('+', '-')}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
