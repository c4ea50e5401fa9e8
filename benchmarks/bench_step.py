"""Training-step throughput and the overhead ratio (DESIGN.md §4): the same as `selfsup bench` (selfsup/bench.py),
kept under this name for the commands in the notes and the README.

    python benchmarks/bench_step.py simclr [key=value ...] [--steps 10] [--threads N] [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from selfsup.bench import main  # noqa: E402
from selfsup.runtime import tune_malloc  # noqa: E402

if __name__ == "__main__":
    tune_malloc()
    sys.exit(main())
