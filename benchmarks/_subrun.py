"""Run one measurement of a benchmark in a fresh interpreter and read its JSON line.

Why a child per measurement: allocator state, thread pools and Opacus hooks of one measurement
must not bleed into the next (peak memory and per-step times are per process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_child(script: str, *args: str) -> dict[str, Any]:
    """`python SCRIPT ARGS...`; the last stdout line is the measurement (also echoed)."""
    out = subprocess.run([sys.executable, str(Path(script).resolve()), *args],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row
