"""How fast, and how small, the processes that need no model start.

For each entry point (the CLI with each adapter, an operator command's modules, and the
worker's engine for comparison) a fresh interpreter imports it; the wall time and the peak
resident memory of that interpreter are printed and written to JSON.

    .venv/bin/python bench/startup.py [--repeats 5] [--out bench/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ENTRY_POINTS = {
    "slack adapter (bot.cli + bot.slack)": "import bot.cli; from bot.slack import SlackAdapter",
    "discord adapter (bot.cli + bot.discord)": (
        "import bot.cli; from bot.discord import DiscordAdapter"
    ),
    "operator commands (bot.cli + bot.admin)": "import bot.cli, bot.admin",
    "worker (core.worker + transformers engine)": (
        "import core.worker, core.generation.transformers_engine"
    ),
}
PROBE = (
    "import resource, sys; {code}; "
    "print(int('torch' in sys.modules), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def measure(code: str) -> tuple[float, int, bool]:
    """Wall seconds, peak RSS in MiB, and whether torch was loaded."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    wall_s = time.perf_counter() - started
    torch_loaded, peak_kib = done.stdout.split()
    return wall_s, int(peak_kib) // 1024, torch_loaded == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    args = parser.parse_args()
    results = {}
    for name, code in ENTRY_POINTS.items():
        runs = [measure(code) for _ in range(args.repeats)]
        walls = [r[0] for r in runs]
        results[name] = {
            "median_s": round(statistics.median(walls), 3),
            "min_s": round(min(walls), 3),
            "peak_rss_mib": runs[-1][1],
            "loads_torch": runs[-1][2],
        }
        row = results[name]
        print(
            f"{name:46s} {row['median_s']:.2f} s (min {row['min_s']:.2f}), "
            f"{row['peak_rss_mib']} MiB, torch {'yes' if row['loads_torch'] else 'no'}"
        )
    report = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor(),
        "repeats": args.repeats,
        "entry_points": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
