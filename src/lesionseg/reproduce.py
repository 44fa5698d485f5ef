"""Pipelines over several runs: `reproduce` (the paper's two models) and `compare` (any runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lesionseg.checkpoint import load_checkpoint
from lesionseg.config import PAPER_PRESETS, TrainConfig, build_config
from lesionseg.evaluation import evaluate_checkpoint
from lesionseg.rundir import RunDir
from lesionseg.training import fit


def is_finished(run_dir: Path, config: TrainConfig) -> bool:
    """A run already trained to its last epoch with exactly this config need not train again."""
    run = RunDir(run_dir)
    if not (run.last.is_file() and run.best.is_file()):
        return False
    state = load_checkpoint(run.last)  # compared as configs, so fields added since then take their defaults
    return TrainConfig.from_dict(state["config"]) == config and state["epoch"] == config.epochs


def run_reproduce(out: str | os.PathLike, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Both presets with the same overrides, each in `out/<preset>`; returns the report's numbers."""
    from lesionseg.report import write_report  # matplotlib only when a report is written

    out = Path(out)
    runs = {}
    for preset in PAPER_PRESETS:
        config = build_config(preset, **overrides, out=str(out / preset))
        run_dir = Path(config.out)
        if not is_finished(run_dir, config):
            fit(config, progress=progress)
        evaluate_checkpoint(RunDir(run_dir).best, split="test", out=RunDir(run_dir).eval, progress=progress)
        runs[preset] = run_dir
    return write_report(runs, out)


def run_compare(run_dirs: list[str | os.PathLike], out: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """One table and one set of figures across runs; runs not yet evaluated are scored on the test split."""
    from lesionseg.report import write_report

    runs = {}
    for run_dir in map(Path, run_dirs):
        run = RunDir(run_dir)
        if not (run.eval / "per_image.csv").is_file():
            evaluate_checkpoint(run.best, split="test", out=run.eval, progress=progress)
        name = run_dir.name if run_dir.name not in runs else str(run_dir)
        runs[name] = run_dir
    return write_report(runs, out)
