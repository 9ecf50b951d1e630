"""PPO throughput, ours vs TRL 1.12.0, on identical work -- in one invocation.

    python benchmarks/ppo_vs_trl.py            # full run (~15 min on 2 CPU cores)
    python benchmarks/ppo_vs_trl.py --quick    # the two small configurations (~2 min)

Both sides load the same tokenizer, the same saved random GPT-2 weights (policy = reference init,
reward = value init) and the same prompt token ids, with the same batch size, prompt length,
response length (full length: pad/EOS cannot be sampled, see bench_common.py), temperature 0.7,
2 PPO epochs x 2 minibatches, k1 KL at beta 0.05, the same number of torch threads, and the same
precision: each configuration runs in fp32 on both sides, in bf16 on both sides (bf16 autocast with
fp32 weights; TRL `bf16=True`), and at each side's default (ours: `run.dtype`'s default; TRL's:
bf16=True), all in one invocation (`--precisions`); a run that two of these share is run once. Each side
runs in its own subprocess (ours with this Python, TRL with --trl-python, the virtualenv described
in benchmarks/README.md), so its peak RSS is its own. Reported: median wall seconds per PPO update
over `--updates` updates after one warm-up update, tokens/s = batch x (prompt + response) / that,
CPU seconds per update (less sensitive to other load on a shared machine), peak RSS, the phase
split (generate / score / train), MFU against the matmul peak measured here in the dtype that
side computed in (fp32 and bf16 peaks, both measured), and ours/TRL. The CPU model and its flags
are recorded with the results: figures from different kinds of machine never share a ratio.
Each case runs `--rounds` times with the sides alternating, each run starting in a quiet moment when
there is one (`--quiet-wait`), and each side keeps its fastest round: on a shared 2-core machine other
sessions' load otherwise decides the result. The figures of every round are in the JSON.
Results: benchmarks/results/ppo_vs_trl.json (--quick: ppo_vs_trl_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

SMALL, LARGE = bc.ModelShape(2, 64), bc.ModelShape(4, 256)

# The four configurations of docs PERFORMANCE.md (both sides).
MAIN = [bc.Case(SMALL, 8, 8, 16), bc.Case(SMALL, 32, 16, 64), bc.Case(LARGE, 8, 8, 16), bc.Case(LARGE, 32, 16, 64)]
QUICK = MAIN[:2]
# --device cuda: a ~0.5B-parameter GPT-2 shape (24 layers, d=1280: 472M in the blocks), bf16 autocast.
GPU_SHAPE = bc.ModelShape(24, 1280, 20)
GPU = [bc.Case(GPU_SHAPE, b, 64, 256, device="cuda", precision="bf16") for b in (32, 128)]
# Scaling sweeps around 2 layers d=64, B=32, 16+64 (overhead-bound) and 4 layers d=256 (compute).
SWEEPS = {
    "response_len": [bc.Case(SMALL, 32, 16, r) for r in (16, 64, 256)],
    "batch": [bc.Case(SMALL, b, 16, 64) for b in (8, 32, 128)],
    "depth": [bc.Case(bc.ModelShape(n, 256), 32, 16, 64) for n in (2, 4, 8)],
}
# Scaling points TRL also runs in the full benchmark (the rest of the sweeps are ours only).
TRL_SWEEP_POINTS = {bc.Case(SMALL, 32, 16, 256), bc.Case(SMALL, 128, 16, 64),
                    bc.Case(bc.ModelShape(8, 256), 32, 16, 64)}


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (up to max_wait s) for a 1-s window in which other processes keep < threshold cores busy.

    Returns the busy cores of the last window. Other sessions' test runs come and go on a shared
    machine; starting a measurement in a quiet moment makes its figures far less noisy.
    """
    deadline = time.time() + max_wait
    while True:
        busy0, _ = bc.busy_jiffies()
        time.sleep(1.0)
        busy1, _ = bc.busy_jiffies()
        cores = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
        if cores < threshold or time.time() >= deadline:
            return cores


def run_worker(python: str, script: str, case: bc.Case, paths: dict, updates: int, threads: int,
               timeout: int, omp_wait_policy: str) -> dict:
    """Run one side of one case in a fresh process; its RESULT_JSON line, or {'error': ...}.

    Also measures how busy the machine was with other work meanwhile (cores busy outside the
    worker), because a shared machine's load can swamp the difference between two trainers.
    """
    cmd = [python, str(HERE / script), json.dumps(case.to_json()), json.dumps(paths), str(updates), str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    ticks = os.sysconf("SC_CLK_TCK")
    jiffies0 = bc.cpu_jiffies()
    child0 = os.times()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    jiffies1 = bc.cpu_jiffies()
    child1 = os.times()
    own = (child1.children_user + child1.children_system) - (child0.children_user + child0.children_system)
    others = max(0.0, ((jiffies1["busy"] - jiffies0["busy"]) / ticks - own) / wall)
    steal = (jiffies1["steal"] - jiffies0["steal"]) / ticks / wall
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON: "):
            out = json.loads(line[len("RESULT_JSON: "):])
            out["other_load_cores"], out["steal_cores"] = others, steal
            out["omp_wait_policy"] = omp_wait_policy or None
            return out
    tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
    return {"error": f"exit {proc.returncode}: {tail}"}


def measure_peak(threads: int, omp_wait_policy: str, device: str = "cpu", dtype: str = "float32") -> float:
    """Matmul peak in GFLOP/s of `dtype` ("float32" or "bfloat16"), in a fresh process with the
    workers' threading environment (on a CUDA device: bf16 only)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    call = "1000 * bench_common.gpu_bf16_peak_tflops()" if device == "cuda" else \
        f"bench_common.matmul_peak_gflops({threads}, dtype={dtype!r})"
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_common; print({call})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def summarise(res: dict, case: bc.Case, peaks: dict[str, float]) -> dict:
    """Medians, tokens/s and MFU (against the peak of the precision the side computed in) of one
    worker result."""
    if "error" in res:
        return res
    med = statistics.median(res["update_s"])
    flops = bc.useful_flops(case)
    res["median_s"] = med
    res["median_cpu_s"] = statistics.median(res["cpu_s"])
    res["tokens_per_s"] = case.tokens_per_update / med
    res["phases_median_s"] = {k: statistics.median(v) for k, v in res["phases_s"].items()}
    res["useful_gflop"] = flops["total"] / 1e9
    res["mfu"] = flops["total"] / med / (peaks[res["dtype"]] * 1e9)
    return res


def best_round(runs: list[dict]) -> dict:
    """The run with the lowest median s/update (errors only if every round failed); all rounds'
    medians are kept in `round_medians_s`."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = dict(min(ok, key=lambda r: r["median_s"]))
    best["round_medians_s"] = [r["median_s"] for r in ok]
    best["round_other_load_cores"] = [r["other_load_cores"] for r in ok]
    return best


def fmt_row(cells: list, widths: list[int]) -> str:
    return " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def print_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [fmt_row(header, widths), "-+-".join("-" * w for w in widths)] + [fmt_row(r, widths) for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def side_cells(r: dict | None) -> list:
    if r is None:
        return ["-"] * 8
    if "error" in r:
        return ["error"] + ["-"] * 7
    ph = r["phases_median_s"]
    return [{"float32": "fp32", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"]), f"{r['median_s']:.3f}",
            f"{r['tokens_per_s']:,.0f}", f"{r['median_cpu_s']:.2f}",
            f"{r['peak_rss_mb']:,.0f}" + (f" (GPU {r['peak_gpu_mb']:,.0f})" if r.get("peak_gpu_mb") else ""),
            f"{ph['generate']:.2f}/{ph['score']:.2f}/{ph['train']:.2f}",
            f"{100 * r['mfu']:.1f}%", f"{r['other_load_cores']:.1f}"]


def ratio(ours: dict | None, trl: dict | None, key: str) -> float | None:
    if not ours or not trl or "error" in ours or "error" in trl:
        return None
    return ours[key] / trl[key]


def source_state() -> dict:
    """Which code of ours was measured: commit, and a hash of src/ (uncommitted edits included)."""
    import hashlib

    repo = HERE.parent
    digest = hashlib.sha256()
    for path in sorted((repo / "src" / "ppo_rlhf").rglob("*.py")):
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=repo, capture_output=True,
                               text=True).stdout.strip().splitlines()
    except OSError:
        commit, dirty = "", []
    return {"commit": commit, "src_sha256": digest.hexdigest()[:16], "uncommitted_src_files": len(dirty)}


def machine_info(threads: int, peaks: dict[str, float]) -> dict:
    """The machine a result comes from: results of different kinds never share a ratio."""
    import torch

    cpu, flags = bc.cpu_model_and_flags()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_flags": flags, "kind": bc.machine_kind(), "gpu": gpu, "cores": os.cpu_count(),
            "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            **{f"matmul_peak_gflops_{dtype}": peak for dtype, peak in peaks.items()},
            "platform": platform.platform(), "loadavg_at_end": os.getloadavg()}


def ours_default_precision(case: bc.Case) -> str:
    """The precision our RL stage computes in for `case` when run.dtype is left at its default
    (auto weighs the device, the model's width and the kind of work)."""
    import torch

    from ppo_rlhf.config import RunConfig
    from ppo_rlhf.precision import dtype_choice

    dtype, _ = dtype_choice(RunConfig().dtype, torch.device(case.device), case.model.n_embd, work="rl")
    return {"float32": "fp32", "bfloat16": "bf16"}[dtype]


# TRL 1.12's configs default to bf16=True unless fp16 is set (trl/trainer/*_config.py); the
# worker reports the dtype TRL really used, and a mismatch is printed.
TRL_DEFAULT_PRECISION = "bf16"


def run_case(case: bc.Case, side: str) -> bc.Case:
    """The case a side actually runs for `case`: 'default' becomes the side's own precision, so
    that the same work is run (and timed) once."""
    if case.precision != "default":
        return case
    return case.at(ours_default_precision(case) if side == "ours" else TRL_DEFAULT_PRECISION)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the two 2-layer configurations, 3 updates")
    ap.add_argument("--trl-python", default="/work/trl-venv/bin/python",
                    help="Python of the virtualenv with trl==1.12.0 (see benchmarks/README.md)")
    ap.add_argument("--updates", type=int, default=0, help="timed updates after the warm-up (default 5; quick 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each side")
    ap.add_argument("--work-dir", default="/tmp/ppo_vs_trl_work", help="tokenizer, models and prompts go here")
    ap.add_argument("--out", default="", help="JSON output (default benchmarks/results/ppo_vs_trl[_quick].json)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="run every case this many times, alternating the sides, and keep each side's "
                         "fastest round (default 2; quick 1): robust to bursts of other load")
    ap.add_argument("--quiet-wait", type=float, default=5.0,
                    help="before each run wait up to this many seconds for the machine to be idle")
    ap.add_argument("--only", default="", help="run only the configurations whose label contains this "
                    "(e.g. 'L4-d256 B=32 16+64')")
    ap.add_argument("--no-sweeps", action="store_true", help="skip the scaling sweeps")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the ~0.5B GPT-2 configurations in bf16 on the GPU (MFU against the "
                    "measured bf16 matmul peak) instead of the CPU ones")
    ap.add_argument("--precisions", default="",
                    help="comma-separated, of fp32, bf16, default (each side's own default): the "
                         "main configurations in each, ours against TRL at the same precision "
                         "(default fp32,bf16,default on the CPU; bf16 on CUDA). Sweeps are fp32")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed per worker process")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY of both workers ('' = leave unset). PASSIVE: idle OpenMP threads "
                         "sleep instead of spinning, which keeps other load on a 2-core machine from "
                         "inflating each tiny op to milliseconds (see README)")
    args = ap.parse_args(argv)
    updates = args.updates or (3 if args.quick else 4)
    rounds = args.rounds or (1 if args.quick else 2)
    default_name = "ppo_vs_trl_gpu.json" if args.device == "cuda" else \
        "ppo_vs_trl_quick.json" if args.quick else "ppo_vs_trl.json"
    out_path = Path(args.out) if args.out else HERE / "results" / default_name
    root = Path(args.work_dir)

    trl_python = args.trl_python if Path(args.trl_python).is_file() else None
    if trl_python is None:
        print(f"[ppo_vs_trl] TRL skipped: {args.trl_python} not found. Create the TRL virtualenv as "
              "benchmarks/README.md says, or pass --trl-python PATH.", flush=True)

    precisions = [p for p in (args.precisions or ("bf16" if args.device == "cuda" else "fp32,bf16,default")
                              ).split(",") if p]
    if any(p not in ("fp32", "bf16", "default") for p in precisions):
        ap.error(f"--precisions: {args.precisions!r}: use fp32, bf16 and/or default")
    dtypes = ["bfloat16"] if args.device == "cuda" else ["float32", "bfloat16"]

    def peaks_now() -> dict[str, float]:
        return {dtype: measure_peak(args.threads, args.omp_wait_policy, args.device, dtype) for dtype in dtypes}

    wait_for_quiet(args.quiet_wait)
    first, second = peaks_now(), peaks_now()
    peaks = {dtype: max(first[dtype], second[dtype]) for dtype in dtypes}
    where = "on the GPU" if args.device == "cuda" else f"with {args.threads} threads"
    print(f"[ppo_vs_trl] {bc.machine_kind()}; matmul peak {where}: "
          + ", ".join(f"{dtype} {peak:,.0f} GFLOP/s" for dtype, peak in peaks.items())
          + f"; {updates} timed updates after 1 warm-up per run; {rounds} round(s)", flush=True)

    base_cases = GPU if args.device == "cuda" else QUICK if args.quick else MAIN
    main_cases = [case.at(p) for p in precisions for case in base_cases]
    sweep_cases = {} if (args.quick or args.no_sweeps or args.device == "cuda") else SWEEPS
    todo: list[tuple[bc.Case, bool]] = [(c, True) for c in main_cases]
    for cases in sweep_cases.values():
        for c in cases:
            if all(c != t for t, _ in todo):
                todo.append((c, c in TRL_SWEEP_POINTS))
    if args.only:
        todo = [(c, t) for c, t in todo if args.only in c.label]
        main_cases = [c for c in main_cases if args.only in c.label]
        sweep_cases = {k: v for k, v in sweep_cases.items() if all(args.only in c.label for c in v)}
    results: dict[bc.Case, dict[str, dict]] = {}
    t_start = time.time()
    source_at_start = source_state()
    attempts: dict[bc.Case, dict[str, list[dict]]] = {}  # keyed by the case a side actually runs
    for rnd in range(rounds):
        done: set[tuple[bc.Case, str]] = set()
        for i, (case, with_trl) in enumerate(todo):
            paths = bc.prepare(case, root)
            sides = [("ours", sys.executable, "ours_worker.py")]
            if with_trl and trl_python:
                sides.append(("trl", trl_python, "trl_worker.py"))
            if (i + rnd) % 2:  # alternate which side goes first, so drift in machine load hits both alike
                sides.reverse()
            for side, python, script in sides:
                actual = run_case(case, side)
                if (actual, side) in done:  # e.g. 'default' = a precision already run
                    continue
                done.add((actual, side))
                quiet = wait_for_quiet(args.quiet_wait)
                res = summarise(run_worker(python, script, actual, paths, updates, args.threads, args.timeout,
                                           args.omp_wait_policy), actual, peaks)
                res["other_load_cores_at_start"] = quiet
                res["round"] = rnd
                attempts.setdefault(actual, {}).setdefault(side, []).append(res)
                msg = res["error"][-800:] if "error" in res else (
                    f"{res['dtype']}: {res['median_s']:.3f} s/update, {res['tokens_per_s']:,.0f} tok/s, peak RSS "
                    f"{res['peak_rss_mb']:,.0f} MB, other load {res['other_load_cores']:.1f} cores")
                print(f"[{time.time() - t_start:6.0f} s] round {rnd + 1}/{rounds} {actual.label:<25} {side:<4} {msg}",
                      flush=True)
    for case, _ in todo:
        results[case] = {}
        for side in ("ours", "trl"):
            runs = attempts.get(run_case(case, side), {}).get(side)
            if runs:
                results[case][side] = best_round(runs)
    # Other load depresses a peak measurement: keep the best of the ones at the start and now.
    wait_for_quiet(args.quiet_wait)
    last = peaks_now()
    peaks = {dtype: max(peaks[dtype], last[dtype]) for dtype in dtypes}
    for by_side in results.values():
        for side, res in by_side.items():
            if "error" not in res:
                res["mfu"] = res["useful_gflop"] / res["median_s"] / peaks[res["dtype"]]
                expected = {"trl": TRL_DEFAULT_PRECISION}.get(side)
                if expected and res["case"]["precision"] == expected and \
                        res["dtype"] != {"fp32": "float32", "bf16": "bfloat16"}[expected]:
                    print(f"[ppo_vs_trl] warning: TRL ran in {res['dtype']} for {expected}", flush=True)

    header = ["config", "side", "dtype", "s/update", "tokens/s", "CPU s/upd", "peak RSS MB", "gen/score/train s",
              "MFU", "other load"]
    rows, comparisons = [], []
    for case in main_cases:
        ours, trl = results[case].get("ours"), results[case].get("trl")
        rows.append([case.label, "ours"] + side_cells(ours))
        rows.append(["", "TRL"] + side_cells(trl))
        tps, rss = ratio(ours, trl, "tokens_per_s"), ratio(ours, trl, "peak_rss_mb")
        cpu = ratio(trl, ours, "median_cpu_s")
        rows.append(["", "ours/TRL", "", "", f"{tps:.2f}x" if tps else "-", f"{cpu:.2f}x" if cpu else "-",
                     f"{rss:.2f}x" if rss else "-", "", "", ""])
        comparisons.append({"case": case.to_json(), "label": case.label, "precision": case.precision,
                            "dtypes": {side: r.get("dtype") for side, r in results[case].items()},
                            "ours_over_trl_tokens_per_s": tps,
                            "trl_over_ours_cpu_s": cpu, "ours_over_trl_peak_rss": rss,
                            "mfu": {side: r.get("mfu") for side, r in results[case].items()}})
    print(f"\nPPO update, ours vs TRL 1.12.0 on {bc.machine_kind()} (median of {updates} updates, best of "
          f"{rounds} round(s); MFU against the matmul peak of each side's dtype: "
          + ", ".join(f"{d} {p:,.0f} GFLOP/s" for d, p in peaks.items())
          + "; CPU s/upd ratio = TRL/ours; RSS ratio = ours/TRL; other load = cores busy outside the run)")
    main_table = print_table(rows, header)

    sweep_tables = {}
    for name, cases in sweep_cases.items():
        srows = []
        base = cases[0]
        for case in cases:
            ours, trl = results[case].get("ours"), results[case].get("trl")
            work = bc.useful_flops(case)["total"] / bc.useful_flops(base)["total"]
            grow = (ours["median_s"] / results[base]["ours"]["median_s"]) if ours and "error" not in ours \
                and "error" not in results[base]["ours"] else None
            tps = ratio(ours, trl, "tokens_per_s")
            srows.append([case.label] + side_cells(ours)[1:] + [f"{work:.1f}x", f"{grow:.1f}x" if grow else "-",
                          f"{trl['median_s']:.3f}" if trl and "error" not in trl else "-",
                          f"{tps:.2f}x" if tps else "-"])
        print(f"\nScaling in {name} (ours; work = useful FLOPs relative to the first row)")
        sweep_tables[name] = print_table(srows, ["config", "s/update", "tokens/s", "CPU s/upd", "peak RSS MB",
                                                 "gen/score/train s", "MFU", "other load", "work", "time",
                                                 "TRL s/update", "ours/TRL tok/s"])

    out = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(args.threads, peaks),
           "precisions": precisions,
           "ours_source": {"at_start": source_at_start, "at_end": source_state()},
           "omp_wait_policy": args.omp_wait_policy or None,
           "updates_timed": updates, "rounds": rounds, "trl_python": trl_python, "comparisons": comparisons,
           "sweeps": {name: [c.label for c in cases] for name, cases in sweep_cases.items()},
           "runs": [{"label": case.label, "case": case.to_json(), "useful_flops": bc.useful_flops(case),
                     **{side: res for side, res in results[case].items()}} for case, _ in todo],
           "tables": {"main": main_table, **sweep_tables}, "total_s": time.time() - t_start}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n[ppo_vs_trl] wrote {out_path} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
