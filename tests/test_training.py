import csv
import json
import os

import pytest
import torch

from conftest import write_plain_pairs
from lesionseg.cli import build_parser
from lesionseg.errors import CheckpointError, DataError, Interrupted
from lesionseg.train import training
from lesionseg.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from lesionseg.train.config import ConfigError, build_config, config_overrides
from lesionseg.train.distributed import Process
from lesionseg.train.runsetup import make_loaders
from lesionseg.train.training import fit


def tiny_config(data, out, **overrides):
    values = dict(data=str(data), out=str(out), weights="none", image_size=32, epochs=2, batch_size=4)
    values.update(overrides)
    return build_config("model2-finetune", **values)


def test_fit_writes_a_complete_run(tiny_data, tmp_path):
    run = fit(tiny_config(tiny_data, tmp_path / "run"), progress=False)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "split.json", "log.csv", "last.pt", "best.pt"}
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["train_loss"]) > 0 and float(r["train_images_per_s"]) > 0 for r in rows)
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 9 and len(split["val"]) == 1 and not set(split["train"]) & set(split["val"])
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizer", "config", "best_metric", "history"}
    model, config = model_from_checkpoint(load_checkpoint(run))
    assert config.image_size == 32 and not model.training


def test_presets_are_the_papers_experiments():
    frozen = build_config("model1-frozen")
    finetune = build_config("model2-finetune", epochs=3, lr=0.01)
    assert frozen.freeze_encoder and frozen.loss == {"bce": 1.0, "dice": 0.1}
    assert not finetune.freeze_encoder and finetune.loss == {"bce": 1.0}
    assert (finetune.epochs, finetune.lr) == (3, 0.01)
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_config("model1-frozen", image_size=100)
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("model3")


def test_same_seed_same_training(tiny_data, tmp_path):
    a = fit(tiny_config(tiny_data, tmp_path / "a", epochs=1), progress=False)
    b = fit(tiny_config(tiny_data, tmp_path / "b", epochs=1), progress=False)
    assert (a / "split.json").read_text() == (b / "split.json").read_text()
    wa, wb = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_leaves_a_usable_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    calls = []
    original = training.train_one_epoch

    def interrupted_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(training, "train_one_epoch", interrupted_in_epoch_two)
    with pytest.raises(Interrupted, match="after epoch 1"):
        fit(tiny_config(tiny_data, tmp_path / "run", epochs=3), progress=False)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1
    model, _ = model_from_checkpoint(state)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "config": {}, "epoch": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"model": {}, "config": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder_is_a_clear_error(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    save_checkpoint({"model": {}, "config": {}, "epoch": 1}, path / "last.pt")
    path.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="previous one is intact"):
            save_checkpoint({"model": {}, "config": {}, "epoch": 2}, path / "last.pt")
    finally:
        path.chmod(0o755)


@pytest.mark.parametrize("content", [b"garbage", None])
def test_unreadable_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "best.pt"
    if content:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_warmup_then_cosine_schedule():
    from lesionseg.train.training import build_scheduler

    config = build_config("unet-finetune", epochs=4, lr=1.0, warmup_epochs=1, weights="none")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)  # linear warm-up over epoch 1
    assert rates[10] == pytest.approx(1.0) and rates[25] == pytest.approx(0.5, abs=0.06)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[-1] < 0.01


def test_early_stopping_on_validation_iou(tiny_data, tmp_path, monkeypatch):
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.9])

    def fake_validate(*args):
        return {"val_loss": 1.0, "val_iou": next(scores), "val_dice": 0.0}

    monkeypatch.setattr(training, "validate", fake_validate)
    run = fit(tiny_config(tiny_data, tmp_path / "run", epochs=6, monitor="val_iou", patience=2), progress=False)
    state = load_checkpoint(run / "best.pt")
    assert state["epoch"] == 2 and state["best_metric"] == 0.6
    assert load_checkpoint(run / "last.pt")["epoch"] == 4  # epochs 3 and 4 did not beat epoch 2


@pytest.mark.parametrize("arch", ["unet", "smp-unet"])
def test_other_archs_train_and_reload(arch, tiny_data, tmp_path):
    run = fit(tiny_config(tiny_data, tmp_path / arch, epochs=1, arch=arch), progress=False)
    model, config = model_from_checkpoint(load_checkpoint(run))
    assert config.arch == arch and model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_extra_data_is_added_to_training_and_never_to_validation(tiny_data, tmp_path):
    extra = write_plain_pairs(tmp_path / "extra", 5)
    config = tiny_config(tiny_data, tmp_path / "run", extra_data=[str(extra)])
    (tmp_path / "run").mkdir()
    train, val, everything = make_loaders(config, tmp_path / "run", Process())
    assert len(train.dataset) == 9 + 5 and len(val.dataset) == 1 and len(everything) == 15
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["extra_train"] == [f"ISIC_extra{n:04d}" for n in range(5)]
    assert not set(split["val"]) & set(split["extra_train"]) and len(split["train"]) == 9
    assert everything.fingerprint.count("+") == 1  # run.json tells runs with and without the extra data apart


def test_extra_data_repeating_a_training_image_is_refused(tiny_data, tmp_path):
    extra = write_plain_pairs(tmp_path / "extra", 2, prefix="ISIC_train")  # same ids as two training images
    with pytest.raises(DataError, match=r"extra: image ISIC_train0000 \(and 1 more\) is already in the training data"):
        fit(tiny_config(tiny_data, tmp_path / "run", extra_data=[str(extra)]), progress=False)


def test_unet_with_scse_attention_trains_and_reloads(tiny_data, tmp_path):
    run = fit(
        tiny_config(tiny_data, tmp_path / "scse", epochs=1, arch="unet", decoder_attention="scse"), progress=False
    )
    model, config = model_from_checkpoint(load_checkpoint(run))
    assert config.decoder_attention == "scse" and model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert build_config("unet-finetune").decoder_attention == "scse"
    with pytest.raises(ConfigError, match="unknown decoder_attention 'cbam'"):
        build_config("unet-finetune", decoder_attention="cbam")


def encoder_bn(model):
    return next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_freeze_bn_keeps_encoder_statistics_while_its_weights_learn(tiny_data, tmp_path):
    run = fit(tiny_config(tiny_data, tmp_path / "run", epochs=1, freeze_bn=True), progress=False)
    trained, _ = model_from_checkpoint(load_checkpoint(run / "last.pt"))
    norms = [m for m in trained.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)  # still their init
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert any(not torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)  # their affine weights learned
    decoder_norm = trained.decoder.blocks[0][1]
    assert not torch.equal(decoder_norm.running_mean, torch.zeros_like(decoder_norm.running_mean))


def test_encoder_learns_at_a_scaled_learning_rate(tiny_data, tmp_path):
    from lesionseg.train.models import build_model

    config = tiny_config(tiny_data, tmp_path / "run", lr=0.01, encoder_lr_scale=0.1)
    model = build_model("seed")
    decoder, encoder = training.build_optimizer(config, model).param_groups
    assert decoder["lr"] == pytest.approx(0.01) and encoder["lr"] == pytest.approx(0.001)
    assert len(encoder["params"]) == len(list(model.encoder.parameters()))
    frozen = tiny_config(tiny_data, tmp_path / "run", freeze_encoder=True)
    assert len(training.build_optimizer(frozen, build_model("seed", freeze_encoder=True)).param_groups) == 1


def test_unfreeze_after_trains_the_decoder_alone_first(tiny_data, tmp_path, monkeypatch):
    snapshots = []  # (first encoder conv, first encoder BN mean, decoder head) before training and after each epoch

    def snapshot(model):
        snapshots.append(
            [
                t.detach().clone()
                for t in (
                    model.encoder.backbone.features[0][0].weight,
                    encoder_bn(model).running_mean,
                    model.decoder.head.weight,
                )
            ]
        )

    original = training.train_one_epoch

    def recording(model, *args, **kwargs):
        if not snapshots:
            snapshot(model)
        result = original(model, *args, **kwargs)
        snapshot(model)
        return result

    monkeypatch.setattr(training, "train_one_epoch", recording)
    fit(tiny_config(tiny_data, tmp_path / "run", epochs=2, unfreeze_after=1), progress=False)
    start, warm, thawed = snapshots
    assert torch.equal(start[0], warm[0]) and torch.equal(start[1], warm[1])  # encoder still, statistics too
    assert not torch.equal(start[2], warm[2])  # while the decoder learned
    assert not torch.equal(warm[0], thawed[0]) and not torch.equal(warm[1], thawed[1])
    with pytest.raises(ConfigError, match="unfreeze_after"):
        tiny_config(tiny_data, tmp_path / "bad", epochs=2, unfreeze_after=2)


def test_amp_on_the_cpu_trains_in_bfloat16_channels_last_and_warns_where_that_is_slow(
    tiny_data, tmp_path, monkeypatch, capsys
):
    conv = torch.nn.Conv2d(3, 4, 3)
    with training.autocast(torch.device("cpu"), True):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    run = fit(tiny_config(tiny_data, tmp_path / "amp", epochs=1, amp=True, channels_last=True), progress=False)
    assert "WARNING: --amp on this CPU" in capsys.readouterr().err
    row = next(csv.DictReader(open(run / "log.csv")))
    assert 0 < float(row["train_loss"]) < 10 and 0 <= float(row["val_iou"]) <= 1
    model, config = model_from_checkpoint(load_checkpoint(run))
    assert config.amp and config.channels_last and next(model.parameters()).dtype == torch.float32


def test_split_seed_fixes_the_validation_images_while_the_seed_changes(tiny_data, tmp_path):
    def validation(name: str, **overrides) -> list[str]:
        (tmp_path / name).mkdir()
        make_loaders(tiny_config(tiny_data, tmp_path / name, val_fraction=0.5, **overrides), tmp_path / name, Process())
        return json.loads((tmp_path / name / "split.json").read_text())["val"]

    fixed = [validation(f"fixed{seed}", seed=seed, split_seed=7) for seed in range(3)]
    assert fixed[0] == fixed[1] == fixed[2] == validation("seed7", seed=7) and len(fixed[0]) == 5
    assert len({tuple(validation(f"free{seed}", seed=seed)) for seed in range(3)}) > 1  # by default the seed draws it
    overrides = config_overrides(build_parser().parse_args(["train", "--split-seed", "3"]))
    assert (
        build_config("unet-finetune", **overrides).split_seed == 3 and build_config("unet-finetune").split_seed is None
    )


def test_init_starts_from_a_trained_model_and_records_it(tiny_data, tmp_path, capsys):
    source = fit(tiny_config(tiny_data, tmp_path / "source", arch="unet", epochs=1), progress=False)
    # lr 0: the weights stay the source's, so what the new run started from is visible in its checkpoint
    run = fit(
        tiny_config(tiny_data, tmp_path / "larger", arch="unet", epochs=1, image_size=64, lr=0.0, init=str(source)),
        progress=False,
    )
    started, trained = load_checkpoint(source)["model"], load_checkpoint(run / "last.pt")["model"]
    convs = [k for k in started if k.endswith("weight") and started[k].dim() == 4]
    assert convs and all(torch.equal(started[k], trained[k]) for k in convs)
    init = json.loads((run / "run.json").read_text())["init"]
    assert init["checkpoint"] == str((source / "best.pt").resolve()) and len(init["sha256"]) == 64
    assert init["weights"] == {"pretrained": False, "source": "none", "sha256": None}
    assert "WARNING" not in capsys.readouterr().err  # the same seed held out the same images
    fit(tiny_config(tiny_data, tmp_path / "seed1", arch="unet", epochs=1, seed=1, init=str(source)), progress=False)
    assert "validation images trained the --init model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"best\.pt: cannot start from this model: its arch 'unet'"):
        fit(tiny_config(tiny_data, tmp_path / "other", arch="seed", init=str(source)), progress=False)
    args = build_parser().parse_args(["train", "--init", str(source)])
    assert args.init == str(source)


def test_soft_masks_train_on_coverage_and_validate_on_binary_masks(tiny_data, tmp_path):
    extra = write_plain_pairs(tmp_path / "extra", 3)
    config = tiny_config(tiny_data, tmp_path / "soft", soft_masks=True, epochs=1, extra_data=[str(extra)])
    (tmp_path / "soft").mkdir()
    train, val, _ = make_loaders(config, tmp_path / "soft", Process())
    targets, checked = train.dataset.split.masks, val.dataset.split.masks
    assert len(targets) == 9 + 3 and targets.dtype == torch.float16
    assert ((targets[:9] > 0) & (targets[:9] < 1)).any() and ((targets[9:] > 0) & (targets[9:] < 1)).any()
    assert checked.dtype == torch.uint8 and set(checked.unique().tolist()) <= {0, 1}
    fit(config, progress=False)
    overrides = config_overrides(build_parser().parse_args(["train", "--soft-masks"]))
    assert build_config("unet-finetune", **overrides).soft_masks and not build_config("unet-finetune").soft_masks
