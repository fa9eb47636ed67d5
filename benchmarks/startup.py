"""Start-up time of the ``lssf`` command line against a bare ``python -c "import torch"``.

Each command runs in a fresh subprocess, the commands alternate within a round, and the table
shows the median of ``--repeats`` rounds (default 5) and the overhead over bare torch. Target
(issue #13): core commands and ``--help``/``--version`` within 1.0 s of bare torch.

Run: ``.venv/bin/python benchmarks/startup.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

LSSF = [sys.executable, "-m", "lssf.cli"]
COMMANDS: dict[str, list[str]] = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "lssf --help": [*LSSF, "--help"],
    "lssf --version": [*LSSF, "--version"],
    "lssf extract --help": [*LSSF, "extract", "--help"],
    "lssf fuse --help": [*LSSF, "fuse", "--help"],
    "lssf inspect --help": [*LSSF, "inspect", "--help"],
    "lssf config --help": [*LSSF, "config", "--help"],
    "lssf evaluate --help": [*LSSF, "evaluate", "--help"],
    "lssf organism --help": [*LSSF, "organism", "--help"],
}


def wall(cmd: list[str]) -> float:
    """Seconds one subprocess takes, output discarded; a failing command is an error."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    wall(COMMANDS['python -c "import torch"'])  # warm the page cache
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(wall(cmd))
    base = statistics.median(next(iter(times.values())))
    print(f"| command | median of {args.repeats} (s) | over bare torch (s) |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| `{name}` | {med:.2f} | {med - base:+.2f} |")


if __name__ == "__main__":
    main()
