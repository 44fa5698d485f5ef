"""Training as fast as the CPU allows, by default: a caching allocator preloaded, bf16 and NHWC where they pay,
and run.json saying what ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lesionseg.train.allocator import find_library
from lesionseg.train.config import build_config
from lesionseg.train.precision import bf16_is_native, resolve_formats

PROBE = "from lesionseg.train.allocator import ensure_caching_allocator, describe; ensure_caching_allocator(); print(describe())"


def probe(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LESIONSEG_ALLOCATOR")}
    return subprocess.run([sys.executable, "-c", PROBE], env=clean | env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(find_library() is None, reason="no tcmalloc installed here (.ci/run installs it)")
def test_training_reexecutes_itself_once_under_tcmalloc():
    done = probe()
    assert done.returncode == 0 and "tcmalloc" in done.stdout, done.stderr


def test_the_allocator_can_be_refused_and_a_missing_one_is_a_note():
    done = probe(LESIONSEG_ALLOCATOR="system")
    assert done.stdout.strip() == "glibc malloc" and done.stderr == ""
    done = probe(LESIONSEG_ALLOCATOR="/no/such/libtcmalloc.so")
    assert done.stdout.strip() == "glibc malloc"
    assert done.stderr.count("\n") == 1 and "note" in done.stderr and "libtcmalloc-minimal4" in done.stderr


def test_open_formats_resolve_to_bf16_where_native_and_nhwc_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = build_config("unet-finetune")
    assert resolve_formats(auto, cpu) == (bf16_is_native(), True)
    assert resolve_formats(auto, cuda) == (False, False)
    assert resolve_formats(build_config("unet-finetune", amp=False, channels_last=False), cpu) == (False, False)
    assert resolve_formats(build_config("unet-finetune", amp=True), cuda) == (True, False)


def test_run_json_says_what_ran(tiny_data, tmp_path):
    from lesionseg.cli import main

    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--no-pretrained",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--no-amp",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    ran = json.loads((out / "run.json").read_text())["formats"]
    assert ran["precision"] == "float32" and ran["memory_format"] == "channels_last" and ran["compiled"] is False
    assert ran["allocator"] and ran["cpu_capability"] in ("AVX2", "AVX512", "DEFAULT", "NO AVX")
    assert json.loads((out / "run.json").read_text())["cpu"]["cores"] >= 1
