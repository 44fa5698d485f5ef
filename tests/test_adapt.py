"""`lesionseg adapt`: the shipped file rebuilt as a trainable model, the self-check that keeps the starting model
when adapting does not help, the threshold and quality estimate refitted, and bad input refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_plain_pairs
from lesionseg.cli import main
from lesionseg.errors import LesionsegError
from lesionseg.segment.predictors import OnnxPredictor, released_model
from lesionseg.train.adapt import run_adapt
from lesionseg.train.adapt.calibrate import calibration
from lesionseg.train.adapt.clinic import BORDERS, border_index, border_table, jaccard_table
from lesionseg.train.adapt.decide import LOSS_MARGIN, cross_fitted, decided, fitted_border, paired_interval
from lesionseg.train.adapt.unfold import folded_pairs, model_from_onnx, rebuild_gap
from lesionseg.train.config import AdaptRecipe

QUICK = AdaptRecipe(steps=3, folds=2, batch_size=4)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_checkpoint, tmp_path_factory):
    from lesionseg.train.export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("tiny") / "tiny.onnx", fp16_weights=True)


def test_the_released_file_rebuilds_exactly_as_a_trainable_model():
    model, config, predictor = model_from_onnx(released_model())
    assert config.arch == "unet" and config.decoder_attention == "scse" and config.image_size == 128
    assert len(folded_pairs(model)) > 50  # every BatchNorm the exporter folded
    assert rebuild_gap(model, predictor, images=2) < 1e-4
    assert sum(p.requires_grad for p in model.parameters()) > 100


def test_an_int8_or_foreign_file_is_refused_in_one_line(tmp_path):
    from lesionseg.segment.predictors import released_model as shipped

    with pytest.raises(LesionsegError, match="adapt starts from a float file"):
        model_from_onnx(shipped("int8"))


def test_jaccard_per_threshold_matches_a_direct_count():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    truths = [rng.random((20, 24)) > 0.5 for _ in range(3)]
    table = jaccard_table(maps, truths, (0.3, 0.5))
    from lesionseg.segment.pipeline import FIXED_POINT, to_own_size

    fixed = to_own_size(maps[1], 24, 20)
    predicted = fixed >= 0.5 * FIXED_POINT
    direct = (predicted & truths[1]).sum() / (predicted | truths[1]).sum()
    assert table[1, 1] == pytest.approx(direct)


def test_thresholds_are_chosen_on_the_other_folds_only():
    table = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    values, chosen = cross_fitted(table, np.array([0, 0, 1, 1]))
    assert list(chosen) == [1, 1, 0, 0] and values.tolist() == [0.1, 0.1, 0.1, 0.1]  # no peeking at its own fold
    low, high = paired_interval(np.array([0.01, 0.02, 0.015, 0.012, 0.018]))
    assert 0 < low < high


def test_a_clinic_that_outlines_tighter_gets_its_border_moved_in():
    rows, cols = np.indices((64, 64))
    maps, truths = [], []
    for radius in (14, 18, 22, 26):
        distance = np.hypot(rows - 32, cols - 32)
        maps.append((1 / (1 + np.exp(3 * (distance - radius)))).astype(np.float32))  # the model: a sharp disc
        truths.append(distance <= radius * 0.88)  # their outline: 12 % of the radius further in
    table = border_table(np.stack(maps), truths)
    offset, threshold = BORDERS[int(np.argmax(table.mean(axis=0)))]
    assert offset == pytest.approx(-0.12, abs=0.021) and table.max(axis=1).min() > 0.95
    thresholds_alone = table[:, [border_index(0.0, t) for _, t in BORDERS[: len(BORDERS) // 21]]].mean(axis=0)
    assert thresholds_alone.max() < 0.85  # the threshold alone cannot move a sharp edge that far


def test_a_border_offset_in_the_file_is_what_the_pipeline_applies(tiny_onnx, tmp_path):
    from lesionseg.segment.pipeline import Pipeline
    from lesionseg.train.qualityfit import with_metadata

    tighter = with_metadata(tiny_onnx, {"border_offset": "-0.3"}, None, tmp_path / "tighter.onnx")
    assert OnnxPredictor(tighter).border_offset == -0.3 and OnnxPredictor(tiny_onnx).border_offset == 0.0

    class Disc:  # a model that sees a soft disc of radius 20 in every image
        image_size, threshold, name, version, border_offset = 64, 0.5, "disc", "1", -0.3

        def __call__(self, images):
            distance = np.hypot(*(np.indices((64, 64)) - 32))
            return np.broadcast_to(1 / (1 + np.exp(distance - 20)), (len(images), 1, 64, 64)).astype(np.float32)

    probability = Disc()(np.zeros((1, 3, 64, 64), np.uint8))[0, 0]
    area = Pipeline(Disc()).result(probability, (64, 64)).mask.sum()
    assert np.sqrt(area / np.pi) == pytest.approx(20 * 0.7, abs=0.7)
    bad = with_metadata(tiny_onnx, {"border_offset": "nan"}, None, tmp_path / "bad.onnx")
    with pytest.raises(LesionsegError, match="border_offset"):
        OnnxPredictor(bad)


def test_a_border_moves_only_for_a_clear_gain():
    flat = np.array([[0.90, 0.903, 0.899], [0.91, 0.912, 0.905]])  # column 0: the start's own border
    assert fitted_border(flat, 0) == 0  # 0.0025 better elsewhere: noise on 25 masks, not a style
    styled = np.array([[0.80, 0.88, 0.85], [0.82, 0.90, 0.86]])
    assert fitted_border(styled, 0) == 1


def test_the_rule_refuses_a_clear_loss_and_keeps_the_fine_tune_only_for_a_clearly_larger_gain():
    assert decided({"finetune": 0.01, "border": 0.02}) == "border"
    assert decided({"finetune": 0.02, "border": 0.02}) == "border"  # a tie: the simpler lever
    assert decided({"finetune": 0.1297, "border": 0.1289}) == "border"  # a measured near-tie (10 masks)
    assert decided({"finetune": 0.02 + 2 * LOSS_MARGIN, "border": 0.02}) == "finetune"
    assert decided({"finetune": 0.004, "border": 0.0}) == "border"  # the border unmoved: the start kept
    assert decided({"finetune": -LOSS_MARGIN, "border": -0.02}) == "finetune"  # within the margin: not a clear loss
    assert decided({"finetune": -0.02, "border": -0.001}) == "border"
    assert decided({"finetune": -0.02, "border": -0.02}) == "start"


def test_the_quality_estimate_is_measured_on_the_clinic_and_kept_as_shipped():
    from lesionseg.segment.quality import features

    quality = OnnxPredictor(released_model()).quality
    rng = np.random.default_rng(1)
    maps = np.stack([np.pad(np.full((40 + n, 40 + n), 0.95), ((10, 78 - n), (10, 78 - n))) for n in range(25)]).astype(
        np.float32
    )
    maps += rng.random(maps.shape).astype(np.float32) * 0.02
    estimate = np.array([quality.estimate(features(m, 0.5)) for m in maps])
    truth = np.clip(estimate - 0.08, 0, 1)  # a clinic where the estimate is 0.08 too confident
    report = calibration(quality, maps, 0.5, truth)
    assert report["measured_shift"] == pytest.approx(-0.08, abs=0.01) and report["mae"] == pytest.approx(0.08, abs=0.01)
    assert report["shrunk_shift"] == pytest.approx(report["measured_shift"] / 2) and report["applied"] is False


def test_adapt_writes_a_model_predict_takes_and_says_what_it_did(tiny_onnx, tmp_path):
    data = write_plain_pairs(tmp_path / "clinic", 12, size=40)
    report = run_adapt(data, tmp_path / "out", tiny_onnx, QUICK)
    assert report["masks"] == 12 and report["judged"] == 12 and report["chosen"] in ("start", "border", "finetune")
    assert len(report["per_image"]["start"]) == 12
    assert report["jaccard_after"] >= report["jaccard_before"] - LOSS_MARGIN
    model = OnnxPredictor(tmp_path / "out" / "model.onnx")
    assert model.metadata["adapt_masks"] == "12" and json.loads(model.metadata["adapt_gain"])["masks"] == 12
    assert float(model.metadata["threshold"]) == report["threshold"]
    assert model.border_offset == report["border_offset"]
    saved = json.loads((tmp_path / "out" / "adapt.json").read_text())
    assert saved["chosen"] == report["chosen"] and "int8_vs_float" in saved["files"]
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((30, 30, 3), 120, np.uint8)).save(photos / "x.png")
    assert (
        main(
            [
                "predict",
                str(photos),
                "--onnx",
                str(tmp_path / "out" / "model.onnx"),
                "--out",
                str(tmp_path / "p"),
                "--no-progress",
            ]
        )
        == 0
    )


def test_a_fine_tune_that_clearly_loses_is_not_kept(tiny_onnx, tmp_path, monkeypatch):
    """With a fine-tune that ruins the model, the check keeps the starting weights (or its threshold)."""
    from lesionseg.train.adapt import decide

    class Blind(torch.nn.Module):  # sees no lesion anywhere
        def forward(self, x):
            return torch.full((len(x), 1, *x.shape[2:]), -20.0)

    def ruined(start, images, masks, recipe):
        return Blind()

    monkeypatch.setattr(decide, "finetune", ruined)
    data = write_plain_pairs(tmp_path / "clinic", 12, size=40)
    report = run_adapt(data, tmp_path / "out", tiny_onnx, QUICK)
    assert report["chosen"] != "finetune" and report["gains"]["finetune"] < -LOSS_MARGIN


def test_a_review_folder_is_taken_as_it_is_and_only_corrections_judge(tiny_onnx, tmp_path):
    data = write_plain_pairs(tmp_path / "review", 12, size=40)
    stems = sorted(p.stem for p in (data / "masks").iterdir())
    lines = [{"stem": stem, "action": "accepted" if n % 3 else "corrected"} for n, stem in enumerate(stems)]
    (data / "review.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = run_adapt(data, tmp_path / "out", tiny_onnx, QUICK)
    assert report["masks"] == 12 and report["judged"] == 4
    assert report["per_image"]["corrected"] == [line["action"] == "corrected" for line in lines]
    everything = [{"stem": stem, "action": "accepted"} for stem in stems]
    (data / "review.jsonl").write_text("".join(json.dumps(line) + "\n" for line in everything))
    with pytest.raises(LesionsegError, match="no correction to learn from"):
        run_adapt(data, tmp_path / "out2", tiny_onnx, QUICK)
    assert not (tmp_path / "out2" / "model.onnx").exists()


def test_an_earlier_adapt_is_replaced_only_when_asked_and_a_killed_one_is_redone(tiny_onnx, tmp_path, capsys):
    data = write_plain_pairs(tmp_path / "clinic", 12, size=40)
    out = tmp_path / "out"
    first = ["adapt", "--data", str(data), "--out", str(out), "--from", str(tiny_onnx), "--steps", "2", "--folds", "2"]
    assert main([*first, "--no-progress"]) == 0
    before = (out / "model.onnx").read_bytes()
    assert main([*first, "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "model.onnx").read_bytes() == before
    (out / "adapt.json").write_text(
        json.dumps({"data": str(data), "masks": 12, "chosen": "finetune", "state": "writing"})
    )
    (out / "model.onnx").write_bytes(before[:100])  # killed while writing: its own half-written file
    assert main([*first, "--no-progress"]) == 0
    assert "files" in json.loads((out / "adapt.json").read_text())
    assert main([*first, "--overwrite", "--no-progress"]) == 0
    assert main([*first, "--steps", "100000"]) == 2
    assert "steps" in capsys.readouterr().err


def test_too_few_masks_and_bad_pairs_are_one_line_and_write_nothing(tiny_onnx, tmp_path, capsys):
    few = write_plain_pairs(tmp_path / "few", 4, size=40)
    assert main(["adapt", "--data", str(few), "--out", str(tmp_path / "o1"), "--from", str(tiny_onnx)]) == 2
    assert "adapt needs at least 10" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "model.onnx").exists()
    bad = write_plain_pairs(tmp_path / "bad", 12, size=40)
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(bad / "masks" / "ISIC_extra0003.png")
    assert main(["adapt", "--data", str(bad), "--out", str(tmp_path / "o2"), "--from", str(tiny_onnx)]) == 2
    said = capsys.readouterr().err
    assert "ISIC_extra0003.png: mask is 10x10 but its image is 40x40" in said and said.count("\n") == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.onnx").write_text("my own file")
    assert main(["adapt", "--data", str(bad), "--out", str(mine), "--from", str(tiny_onnx)]) == 2
    assert "was not written by lesionseg adapt" in capsys.readouterr().err
    assert (mine / "model.onnx").read_text() == "my own file"


def test_a_file_of_an_unknown_architecture_is_named(tiny_onnx, tmp_path):
    from lesionseg.train.qualityfit import with_metadata

    strange = with_metadata(tiny_onnx, {"arch": "transformer-xl"}, None, tmp_path / "strange.onnx")
    with pytest.raises(LesionsegError) as refused:
        model_from_onnx(strange)
    assert str(refused.value).startswith(str(strange)) and "\n" not in str(refused.value)
