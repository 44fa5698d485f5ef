import json

import pytest

from lesionseg.cli import main


def test_reproduce_end_to_end_on_tiny_data(tiny_data, tmp_path, capsys):
    out = tmp_path / "paper"
    args = [
        "reproduce",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--no-pretrained",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    assert main(args) == 0
    assert (
        "| metric | model1-frozen | model1-frozen (paper) | model2-finetune | model2-finetune (paper) |"
        in capsys.readouterr().out
    )
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["measured"]) == {"model1-frozen", "model2-finetune"}
    for model in report["measured"].values():
        assert set(model) == {"iou", "dice", "train_loss", "val_loss"}
        assert 0 <= model["iou"] <= model["dice"] <= 1
    evaluation = report["evaluations"]["model2-finetune"]
    assert evaluation["images"] == 4
    assert (out / "model2-finetune" / "eval" / "per_image.csv").read_text().count("\n") == 5
    figures = {p.name for p in (out / "figures").iterdir()}
    assert figures >= {
        "samples.png",
        "model_summary.png",
        "radar.png",
        "bars_comparison.png",
        "predictions_model1-frozen.png",
        "loss_model2-finetune.png",
        "bars_model1-frozen.png",
    }
    for preset in ("model1-frozen", "model2-finetune"):
        assert {"config.yaml", "log.csv", "best.pt", "last.pt", "split.json"} <= {
            p.name for p in (out / preset).iterdir()
        }
    assert "| Jaccard (IoU), mean per image | " in (out / "results.md").read_text()

    mtime = (out / "model2-finetune" / "last.pt").stat().st_mtime_ns
    assert main(args) == 0  # finished runs are not trained again
    assert (out / "model2-finetune" / "last.pt").stat().st_mtime_ns == mtime


def test_train_then_evaluate(tiny_data, tmp_path, capsys):
    run = tmp_path / "m1"
    assert (
        main(
            [
                "train",
                "--preset",
                "model1-frozen",
                "--data",
                str(tiny_data),
                "--out",
                str(run),
                "--no-pretrained",
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert set(printed["metrics"]) >= {"iou_per_image", "iou_pooled", "dice_per_image", "dice_pooled"}
    assert (tmp_path / "eval" / "per_image.csv").read_text().count("\n") == 5


def test_summary_prints_the_layer_table(capsys):
    assert main(["summary", "--frozen"]) == 0
    text = capsys.readouterr().out
    assert "Total params: 10,755,913" in text and "Non-trainable params: 3,504,872" in text
    assert "[16, 1280, 4, 4]" in text and "Total mult-adds (Units.GIGABYTES): 5.50" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/no/such/dir", "--no-pretrained"], "/no/such/dir: data folder not found"),
        (["evaluate", "/no/such/run.pt"], "/no/such/run.pt: checkpoint not found"),
        (["train", "--image-size", "100", "--no-pretrained"], "image_size must be a multiple of 32"),
        (["train", "--loss", "hinge", "--no-pretrained"], "unknown loss hinge"),
        (
            ["train", "--extra-data", "/no/extra", "--no-pretrained", "--epochs", "1"],
            "/no/extra: data folder not found",
        ),
    ],
)
def test_bad_input_is_one_line_on_stderr(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_compare_any_runs_with_worst_cases(tiny_data, tmp_path, capsys):
    runs = []
    for arch in ("seed", "unet"):
        run = tmp_path / arch
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(tiny_data),
                    "--out",
                    str(run),
                    "--no-pretrained",
                    "--arch",
                    arch,
                    "--epochs",
                    "1",
                    "--image-size",
                    "32",
                    "--batch-size",
                    "4",
                    "--no-progress",
                ]
            )
            == 0
        )
        runs.append(str(run))
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| metric | seed | unet |" in table and "ISIC 2018 thresholded Jaccard" in table
    figures = {p.name for p in (tmp_path / "cmp" / "figures").iterdir()}
    assert {"worst_seed.png", "worst_unet.png", "radar.png", "bars_comparison.png", "loss_unet.png"} <= figures
    report = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    gap = report["paired_differences"]["unet"]
    means = {name: report["evaluations"][name]["metrics"]["iou_per_image"] for name in ("seed", "unet")}
    assert gap["mean"] == pytest.approx(means["unet"] - means["seed"], abs=1e-6)
    assert gap["ci95_low"] <= gap["mean"] <= gap["ci95_high"] and gap["images"] == 4
    assert "## Against seed, image by image" in (tmp_path / "cmp" / "results.md").read_text()


def test_reproduce_names_its_weights_and_warns_when_from_scratch(tiny_data, tmp_path, monkeypatch):
    import torch
    from torchvision.models import mobilenet_v2

    common = ["--data", str(tiny_data), "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--no-progress"]
    torch.save(mobilenet_v2().state_dict(), tmp_path / "imagenet.pth")
    monkeypatch.setenv("LESIONSEG_WEIGHTS", str(tmp_path / "imagenet.pth"))
    assert main(["reproduce", "--out", str(tmp_path / "pre"), "--weights", "auto", *common]) == 0
    text = (tmp_path / "pre" / "results.md").read_text()
    assert f"`{tmp_path / 'imagenet.pth'}`, sha256 `" in text and "FROM SCRATCH" not in text
    recorded = json.loads((tmp_path / "pre" / "model1-frozen" / "run.json").read_text())["weights"]
    assert recorded["pretrained"] and len(recorded["sha256"]) == 64

    monkeypatch.delenv("LESIONSEG_WEIGHTS")
    assert main(["reproduce", "--out", str(tmp_path / "scratch"), "--no-pretrained", *common]) == 0
    assert (
        "**WARNING: model1-frozen, model2-finetune trained the encoder FROM SCRATCH"
        in (tmp_path / "scratch" / "results.md").read_text()
    )
