"""Gold reward at matched KL across reward sources, from benchmarks/algorithms.py's result files:

    python benchmarks/compare_rewards.py results/algorithms_arithmetic_rm.json \
        results/algorithms_arithmetic_gold.json results/algorithms_arithmetic_process.json --algo ppo

For each result file and seed, the held-out evaluations (gold, KL) are linearly interpolated at
the KL grid; a run that never reached a KL has no value there. Prints mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def gold_at(evals: list[dict], kl: float) -> float | None:
    """Gold reward where the run's held-out KL first reaches `kl` (linear between evaluations)."""
    points = [(e["kl"], e["gold"]) for e in evals if e["kl"] is not None]
    for (k0, g0), (k1, g1) in zip(points, points[1:]):
        if k0 <= kl <= k1 and k1 > k0:
            return g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--algo", default="ppo")
    ap.add_argument("--kl", nargs="*", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    args = ap.parse_args()
    print("| reward | " + " | ".join(f"gold at KL {k}" for k in args.kl) + " | final gold | final KL |")
    print("|---|" + "---|" * (len(args.kl) + 2))
    for path in args.results:
        data = json.loads((HERE / path if not Path(path).is_file() else Path(path)).read_text())
        runs = [r for r in data["results"] if r["algo"] == args.algo]
        cells = []
        for kl in args.kl:
            values = [v for r in runs if (v := gold_at(r["evals"], kl)) is not None]
            cells.append(f"{statistics.mean(values):.3f} ({len(values)})" if values else "n/a")
        final = statistics.mean(r["final_gold"] for r in runs)
        final_kl = statistics.mean(r["final_kl"] for r in runs)
        print(f"| {data['reward']} | " + " | ".join(cells) + f" | {final:.3f} | {final_kl:.2f} |")
    print(f"\n({args.algo}; mean over seeds, the number of seeds that reached each KL in brackets)")


if __name__ == "__main__":
    main()
