"""The one helper the benchmarks share. Each result is written as one envelope that says what produced it:

    {"script", "name", "command", "git_commit", "date", "machine": {cpu, device}, "results": {...}}

Results that belong in the repository go to `benchmarks/results/<script>/<name>.json`. Measurements more than
one script takes (a mask's Jaccard, a run's training time) live here too, so no script imports another.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lesionseg.machine import cpu_info, device_name
from lesionseg.train.rundir import RunDir

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=RESULTS.parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def envelope(results: Any, name: str) -> dict[str, Any]:
    script = Path(sys.argv[0]).stem
    return {
        "script": script,
        "name": name,
        "command": shlex.join([f"benchmarks/{script}.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": device_name(), "cpu": cpu_info()},
        "results": results,
    }


def write_result(path: str | Path, results: Any) -> Path:
    """`results` in its envelope at `path` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(envelope(results, path.stem), indent=1) + "\n")
    return path


def read_result(path: str | Path) -> Any:
    """What a benchmark wrote, without its envelope (files from before envelopes are read as they are)."""
    data = json.loads(Path(path).read_text())
    return data["results"] if isinstance(data, dict) and {"script", "results"} <= set(data) else data


def default_out(name: str) -> Path:
    """benchmarks/results/<this script>/<name>.json"""
    return RESULTS / Path(sys.argv[0]).stem / f"{name}.json"


def jaccard(mask: np.ndarray, truth: np.ndarray) -> float:
    union = (mask | truth).sum()
    return float((mask & truth).sum() / union) if union else 1.0


def best_validation(run: Path) -> dict[str, float]:
    return RunDir(Path(run)).best_validation("val_iou")


def epoch_seconds(run: Path) -> float:
    return RunDir(Path(run)).epoch_seconds()
