"""The layout the code promises: two rooms, `segment` (no PyTorch) and `train` (PyTorch), the arrows one way (held
by import-linter's contracts in pyproject.toml, lazy imports included), each training option declared once and
reachable from the command line, one decoder registry."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lesionseg.cli import build_parser
from lesionseg.train.config import DECODERS, TrainConfig, config_overrides

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lesionseg"


def test_import_linter_holds_the_two_rooms_and_the_layers():
    """`segment` never imports `train`, torch, torchvision or matplotlib, directly or through anything it imports;
    and the command line, API, training, segmenting and the shared ground import only downwards."""
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    done = subprocess.run([linter, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 kept, 0 broken" in done.stdout


def test_every_module_lives_in_a_room():
    """A contributor knows their room from the path: only the shared ground sits at the top."""
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {
        "__init__",
        "__main__",
        "api",
        "cli",
        "commands",
        "dicom",
        "errors",
        "files",
        "images",
        "machine",
        "version",
    }


def test_segmenting_imports_no_pytorch_at_run_time():
    """Every segment module, the API and the command line load with `import torch` made to fail."""
    modules = ", ".join(f"lesionseg.segment.{p.stem}" for p in (PACKAGE / "segment").glob("*.py"))
    code = f"import sys; sys.modules['torch'] = None; import lesionseg.cli, lesionseg.api, {modules}; print(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stdout and "matplotlib" not in done.stdout


def test_the_model_module_does_no_io():
    source = (PACKAGE / "train" / "models.py").read_text()
    assert "torch.load" not in source and "open(" not in source
    assert "lesionseg.train.data" not in source and "lesionseg.files" not in source


def test_every_config_field_can_be_set_from_the_command_line(tmp_path):
    """A field without a flag would be an option declared but not offered: each one is set to a non-default value."""
    values = {
        "name": "x",
        "arch": "unet",
        "freeze_encoder": True,
        "loss": "dice",
        "data": "d",
        "extra_data": "e",
        "out": "o",
        "image_size": 64,
        "epochs": 3,
        "batch_size": 4,
        "lr": 0.5,
        "weight_decay": 0.1,
        "optimizer": "adamw",
        "schedule": "cosine",
        "warmup_epochs": 1.5,
        "monitor": "val_iou",
        "patience": 2,
        "device": "cpu",
        "amp": True,
        "channels_last": True,
        "sync_bn": True,
        "dropout": 0.3,
        "decoder_attention": "scse",
        "val_fraction": 0.2,
        "seed": 5,
        "split_seed": 6,
        "weights": "w.pth",
        "init": "i.pt",
        "freeze_bn": True,
        "encoder_lr_scale": 0.1,
        "unfreeze_after": 1,
        "soft_masks": True,
        "hflip": False,
        "rotation": 10.0,
        "colour_constancy": True,
        "scale": 0.2,
        "colour": 0.3,
        "threshold": 0.4,
        "strict": True,
        "num_workers": 1,
        "cache_dir": "c",
    }
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(values) == fields, "a new field: add it here with a value other than its default"
    argv = ["train"]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    overrides = config_overrides(build_parser().parse_args(argv))
    config = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    for name, value in values.items():
        expected = {"dice": 1.0} if name == "loss" else ["e"] if name == "extra_data" else value
        assert getattr(config, name) == expected != getattr(TrainConfig(), name), name


def test_train_flags_are_the_config_fields_and_shortcuts():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions} - {"help", "preset", "resume", "overwrite", "no_progress"}
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}
    assert train.parse_args(["--no-pretrained"]).weights == "none"


def test_the_decoder_registry_is_what_build_model_and_the_flags_offer():
    from lesionseg.train.models import build_model

    for arch in DECODERS:
        assert build_model(arch).decoder is not None
    arch_action = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "arch"
    )
    assert tuple(arch_action.choices) == tuple(DECODERS)


def test_a_run_folder_names_its_files_and_reads_its_log(tmp_path):
    from lesionseg.train.rundir import RunDir, checkpoint_path

    run = RunDir(tmp_path)
    history = [
        {
            "epoch": e,
            "train_loss": 1.0,
            "val_loss": loss,
            "val_iou": iou,
            "val_dice": 0.0,
            "lr": 0.1,
            "seconds": 2.0,
            "train_images_per_s": 5.0,
        }
        for e, loss, iou in ((1, 0.5, 0.6), (2, 0.4, 0.8), (3, 0.3, 0.7))
    ]
    run.write_log(history)
    assert run.best_validation("val_iou") == {"epochs_run": 3, "best_epoch": 2, "val_iou": 0.8}
    assert run.best_validation("val_loss")["best_epoch"] == 3 and run.epoch_seconds() == 6.0
    assert checkpoint_path(tmp_path) == run.best == tmp_path / "best.pt"
    assert RunDir.of(tmp_path / "last.pt") == run and checkpoint_path(run.last) == run.last


def test_a_config_with_yaml_aliases_is_one_error_not_gigabytes(tmp_path):
    from lesionseg.train.config import ConfigError, read_config

    bomb = tmp_path / "config.yaml"
    bomb.write_text('a: &a ["x", "x"]\nb: &b [*a, *a]\nc: [*b, *b]\n')
    with pytest.raises(ConfigError, match="aliases are not allowed"):
        read_config(bomb)
    bomb.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs must be int"):
        read_config(bomb)
