"""The per-image quality estimate: its features, its fit, how it ships inside a model and where it is reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.special import expit

from lesionseg.errors import LesionsegError
from lesionseg.segment.pipeline import Pipeline
from lesionseg.segment.quality import FEATURES, QualityModel, assess, features
from lesionseg.train.qualityfit import embed, fit, out_of_fold
from lesionseg.train.qualitymetrics import auroc, quality_accuracy, risk_coverage


def disc(size: int = 64, radius: float = 18, blur: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy - size / 2, xx - size / 2) - radius
    return expit(-distance / max(blur, 1e-3))


def test_a_sharp_single_disc_reads_as_confident_and_compact():
    values = features(disc(blur=0.01), 0.5)
    assert set(values) == set(FEATURES)
    assert values["soft_jaccard"] > 0.99 and values["undecided"] < 0.01  # only the rim's own pixels
    assert values["components"] == pytest.approx(np.log(2)) and values["largest_share"] == 1
    assert values["border"] == 0 and values["holes"] == 0
    assert 0.7 < values["compactness"] <= 1
    assert values["area"] == pytest.approx(np.pi * 18**2 / 64**2, rel=0.05)


def test_a_blurred_broken_map_reads_as_uncertain():
    p = disc(blur=6.0)
    p[:, 30:34] = 0.0  # cut in two
    p[0:8, :] = 0.9  # a band along the frame
    values, sharp = features(p, 0.5), features(disc(blur=0.01), 0.5)
    assert values["soft_jaccard"] < sharp["soft_jaccard"] - 0.1
    assert values["undecided"] > 0.2 and values["components"] > np.log(2) and values["border"] > 0.1


def test_an_empty_mask_has_defined_features():
    values = features(np.full((32, 32), 0.1, np.float32), 0.5)
    assert all(np.isfinite(v) for v in values.values()) and values["area"] == 0 and values["soft_jaccard"] == 0


def synthetic(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows whose true Jaccard follows soft_jaccard and undecided, with noise."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, len(FEATURES)))
    y = np.clip(0.4 + 0.5 * x[:, 0] - 0.2 * x[:, 1] + rng.normal(0, 0.05, n), 0, 1)
    return x, y


def test_the_fit_ranks_images_and_reads_as_a_jaccard():
    x, y = synthetic()
    model = fit(x, y, "synthetic")
    accuracy = quality_accuracy(out_of_fold(x, y), y)
    assert accuracy["spearman"] > 0.85 and accuracy["mae"] < 0.07
    estimate = [model.estimate(dict(zip(FEATURES, row))) for row in x]
    assert 0 <= min(estimate) and max(estimate) <= 1
    assert abs(np.mean(estimate) - y.mean()) < 0.01  # isotonic: calibrated on average


def test_accuracy_figures_on_known_cases():
    truth = np.array([0.95, 0.9, 0.85, 0.5, 0.4])
    assert auroc(truth.copy(), truth < 0.7) == 1.0  # a perfect estimate finds every poor mask first
    assert auroc(-truth, truth < 0.7) == 0.0
    rows = risk_coverage(truth.copy(), truth, coverages=(1.0, 0.6))
    assert rows[0]["mean"] == pytest.approx(truth.mean()) and rows[1]["mean"] == pytest.approx(0.9)
    assert rows[1]["worst_decile"] == pytest.approx(0.85)


def test_the_model_survives_its_metadata_and_damage_is_refused():
    x, y = synthetic()
    model = fit(x, y, "synthetic")
    again = QualityModel.from_metadata(model.to_metadata())
    row = dict(zip(FEATURES, x[0]))
    assert again.estimate(row) == model.estimate(row)
    assert QualityModel.from_metadata(None) is None
    for damaged in ("{", json.dumps({"mean": [1]}), model.to_metadata().replace('"soft_jaccard"', '"nope"')):
        with pytest.raises(ValueError, match="metadata quality"):
            QualityModel.from_metadata(damaged)


def test_assess_flags_below_the_review_threshold():
    x, y = synthetic()
    model = fit(x, y, "synthetic")
    sharp, vague = assess(model, disc(blur=0.01), 0.5), assess(model, disc(blur=8.0), 0.5)
    assert sharp.quality > vague.quality
    assert sharp.needs_review == (sharp.quality < model.review_below)
    assert assess(None, disc(), 0.5) is None


class DiscPredictor:
    image_size, threshold, name, version = 32, 0.5, "disc", "1"

    def __init__(self, quality=None) -> None:
        self.quality = quality

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.stack([disc(32, 9, 1.0)[None].astype(np.float32)] * len(images))


def test_every_segmentation_carries_the_estimate_when_the_model_ships_one():
    image = Image.new("RGB", (50, 40))
    plain = Pipeline(DiscPredictor()).segment([image])[0]
    assert plain.quality is None and plain.needs_review is None and plain.stats["quality"] is None
    model = fit(*synthetic(), "synthetic")
    result = Pipeline(DiscPredictor(model)).segment([image])[0]
    assert 0 <= result.quality <= 1 and result.stats["quality"] == result.quality
    assert result.stats["review"] == result.needs_review


def test_an_exported_model_carries_its_estimate_to_predict_and_evaluate(onnx_model, tiny_checkpoint, photos, tmp_path):
    from lesionseg.cli import main
    from lesionseg.segment.predictors import OnnxPredictor
    from lesionseg.train.evaluation import evaluate_checkpoint

    model = fit(*synthetic(), "synthetic")
    with_estimate = embed(onnx_model, model, tmp_path / "with-quality.onnx")
    assert OnnxPredictor(with_estimate).quality == model and OnnxPredictor(onnx_model).quality is None
    main(["predict", str(photos), "--onnx", str(with_estimate), "--out", str(tmp_path / "out"), "--no-progress"])
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert all(0 <= row["quality"] <= 1 and isinstance(row["review"], bool) for row in rows)
    header = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[0]
    assert "quality" in header and "review" in header
    import torch

    data = torch.load(tiny_checkpoint, weights_only=True)["config"]["data"]
    result = evaluate_checkpoint(with_estimate, data, "test", progress=False, source_resolution=True)
    assert result["quality"]["images"] == 4 and "spearman" in result["quality"]
    assert all(f"q_{name}" in result["per_image"][0] for name in FEATURES)


def test_a_model_with_a_damaged_estimate_is_refused_in_one_line(onnx_model, tmp_path):
    import onnx

    from lesionseg.segment.predictors import OnnxPredictor

    proto = onnx.load(str(onnx_model))
    proto.metadata_props.add(key="quality", value="{not json")
    onnx.save(proto, str(tmp_path / "damaged.onnx"))
    with pytest.raises(LesionsegError, match="damaged.onnx: metadata quality is not a lesionseg quality model"):
        OnnxPredictor(tmp_path / "damaged.onnx")


@pytest.fixture(scope="module")
def onnx_model(tiny_checkpoint, tmp_path_factory):
    from lesionseg.train.export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_the_risk_coverage_figure_is_drawn(tmp_path):
    from lesionseg.train.qualityfit import risk_coverage_figure

    x, y = synthetic()
    quality = out_of_fold(x, y)
    path = risk_coverage_figure({"synthetic": (quality, y)}, tmp_path / "rc.png")
    assert Image.open(path).size[0] > 800
    kept = risk_coverage(quality, y, coverages=(1.0, 0.8))
    assert kept[1]["mean"] > kept[0]["mean"]  # setting aside the least trusted raises the mean of the rest


@pytest.mark.parametrize(
    "damage, says",
    [
        ({"coef": [float("nan")] * len(FEATURES)}, "not a finite number"),
        ({"scale": [0.0] * len(FEATURES)}, "scale is not positive"),
        ({"review_below": "abc"}, "review_below 'abc'"),
        ({"intercept": float("inf")}, "not a finite number"),
    ],
)
def test_a_damaged_estimate_is_refused_at_load_never_answered_as_nan(damage, says):
    """NaN coefficients would answer "quality NaN, no review needed" for every mask."""
    model = fit(np.random.default_rng(0).random((40, len(FEATURES))), np.linspace(0.3, 1, 40), "test")
    values = json.loads(model.to_metadata()) | damage
    with pytest.raises(ValueError, match=says):
        QualityModel.from_metadata(json.dumps(values))
