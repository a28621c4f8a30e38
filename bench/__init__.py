"""Benchmarks of the whole system: `python -m bench.run` writes docs/BENCHMARKS.md.

The benchmarks reuse the test helpers (real agent processes, the exo stand-in), so the
tests folder goes on the import path as soon as any benchmark module is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"

if str(TESTS_DIR) not in sys.path:
    sys.path.append(str(TESTS_DIR))
