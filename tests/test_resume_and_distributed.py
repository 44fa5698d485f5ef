"""Crash-safe, reproducible and multi-process training (run as real subprocesses)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_dataset
from lesionseg.cli import main
from lesionseg.train.checkpoint import load_checkpoint

TRAIN = [
    "--preset",
    "model2-finetune",
    "--no-pretrained",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--schedule",
    "cosine",
    "--warmup-epochs",
    "1",
    "--no-progress",
]


def same_weights(a, b) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def losses(run) -> list[float]:
    return [float(r["train_loss"]) for r in csv.DictReader(open(run / "log.csv"))]


@pytest.fixture
def data40(tmp_path):
    return write_dataset(tmp_path / "data40", {"train": 40, "test": 2}, size=40, seed=2)


def test_sigkill_mid_epoch_then_resume_ends_with_the_same_weights(data40, tmp_path):
    common = [*TRAIN, "--data", str(data40), "--epochs", "3"]
    reference = tmp_path / "reference"
    assert main(["train", *common, "--out", str(reference)]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lesionseg", "train", *common, "--out", str(killed)], env=env)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for epoch 1's checkpoint, then kill inside epoch 2
        if (killed / "log.csv").is_file() and len(losses(killed)) >= 1 and (killed / "last.pt").is_file():
            break
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    epoch_at_kill = load_checkpoint(killed / "last.pt")["epoch"]
    assert 1 <= epoch_at_kill < 3, "the run must be killed before it finished"

    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert load_checkpoint(killed / "last.pt")["epoch"] == 3
    assert same_weights(reference / "last.pt", killed / "last.pt")
    assert losses(reference) == losses(killed)


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing: run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "config.yaml: not found" in capsys.readouterr().err


def test_run_folder_records_versions_data_and_commit(tiny_data, tmp_path):
    assert main(["train", *TRAIN, "--data", str(tiny_data), "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["torch"] == torch.__version__ and info["processes"] == 1
    assert len(info["data_fingerprint"]) == 20 and "git_commit" in info
    assert info["config"]["schedule"] == "cosine"


def test_two_cpu_processes_follow_the_single_process_loss_curve(data40, tmp_path):
    common = [*TRAIN, "--data", str(data40), "--epochs", "3", "--dropout", "0", "--device", "cpu"]
    single = tmp_path / "single"
    assert main(["train", *common, "--out", str(single)]) == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lesionseg",
            "train",
            *common,
            "--out",
            str(double),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("trained:") == 1  # rank 0 alone reports
    info = json.loads((double / "run.json").read_text())
    assert info["processes"] == 2
    one, two = losses(single), losses(double)
    assert len(one) == len(two) == 3
    # the same global batches and augmentations; only BatchNorm sees half-batches per process
    assert all(abs(a - b) < 0.05 * a for a, b in zip(one, two)), (one, two)
    assert json.loads((single / "split.json").read_text()) == json.loads((double / "split.json").read_text())
