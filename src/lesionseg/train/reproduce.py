"""Pipelines over several runs: `reproduce` (the paper's two models) and `compare` (any runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lesionseg.errors import LesionsegError
from lesionseg.files import claim_output_folder, shown
from lesionseg.train.checkpoint import load_checkpoint
from lesionseg.train.config import PAPER_PRESETS, TrainConfig, build_config, read_config
from lesionseg.train.evaluation import evaluate_checkpoint
from lesionseg.train.rundir import RunDir
from lesionseg.train.training import fit


def claim_report_folder(out: str | os.PathLike) -> Path:
    """The report's folder, refused before any training if it holds a report lesionseg did not write."""
    return claim_output_folder(out, "metrics.json", {"measured", "paper"}, ("results.md",), "reproduce or compare")


def is_finished(run_dir: Path, config: TrainConfig) -> bool:
    """A run already trained to its last epoch with exactly this config need not train again."""
    run = RunDir(run_dir)
    if not (run.last.is_file() and run.best.is_file()):
        return False
    state = load_checkpoint(run.last)  # compared as configs, so fields added since then take their defaults
    return TrainConfig.from_dict(state["config"]) == config and state["epoch"] == config.epochs


def is_unfinished(run_dir: Path, config: TrainConfig) -> bool:
    """A run of exactly this config that stopped before its last epoch (any other run there is refused)."""
    run = RunDir(run_dir)
    return run.config.is_file() and run.last.is_file() and read_config(run.config) == config


def run_reproduce(out: str | os.PathLike, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Both presets with the same overrides, each in `out/<preset>`; returns the report's numbers."""
    from lesionseg.train.report import write_report  # matplotlib only when a report is written

    out = claim_report_folder(out)
    runs = {}
    for preset in PAPER_PRESETS:
        config = build_config(preset, **overrides, out=str(out / preset))
        run_dir = Path(config.out)
        if not is_finished(run_dir, config):  # an unfinished run of this very config is continued
            fit(config, progress=progress, resume=is_unfinished(run_dir, config))
        evaluate_checkpoint(RunDir(run_dir).best, split="test", out=RunDir(run_dir).eval, progress=progress)
        runs[preset] = run_dir
    return write_report(runs, out)


def run_compare(run_dirs: list[str | os.PathLike], out: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """One table and one set of figures across runs; runs not yet evaluated are scored on the test split."""
    from lesionseg.train.report import write_report

    claim_report_folder(out)
    runs = {}
    named = [Path(r) for r in run_dirs]
    for n, run_dir in enumerate(named):
        if not RunDir(run_dir).best.is_file():
            raise LesionsegError(f"{shown(run_dir)}: not a trained run (no best.pt)")
        if any(os.path.samefile(run_dir, other) for other in named[:n]):
            raise LesionsegError(f"{shown(run_dir)}: named twice; compare takes different runs")
    for run_dir in named:
        run = RunDir(run_dir)
        if not (run.eval / "per_image.csv").is_file():
            evaluate_checkpoint(run.best, split="test", out=run.eval, progress=progress)
        name = run_dir.name if run_dir.name not in runs else str(run_dir)
        runs[name] = run_dir
    return write_report(runs, out)
