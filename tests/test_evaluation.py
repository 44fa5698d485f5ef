import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_dataset
from lesionseg.errors import LesionsegError
from lesionseg.segment.pipeline import Pipeline, Refinements, refined_mask
from lesionseg.train.config import build_config
from lesionseg.train.evaluation import evaluate_checkpoint
from lesionseg.train.training import fit


class ArrayModel:
    """A predictor from a function of the uint8 batch (a ramp, a per-pixel rule), for the pipeline's views."""

    image_size, threshold, name, version = 8, 0.5, "test", "0"

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, images):
        return 1 / (1 + np.exp(-self.logits(images.astype(np.float32))))


def probabilities(logits, images, **refine):
    return Pipeline(ArrayModel(logits), Refinements(**refine)).probabilities(images)


def ramp(x):  # a model that is not flip-equivariant: its logit grows to the right, whatever the image
    return np.broadcast_to(np.linspace(-3, 3, x.shape[-1]), (x.shape[0], 1, x.shape[-2], x.shape[-1])).copy()


def test_largest_component_and_fill_holes():
    p = np.zeros((20, 20))
    p[2:12, 2:12] = 0.9
    p[5:8, 5:8] = 0.1  # a hole
    p[15:18, 15:18] = 0.9  # a speck elsewhere
    plain = refined_mask(p, 0.5, Refinements())
    assert plain[16, 16] and not plain[6, 6]
    refined = refined_mask(p, 0.5, Refinements(largest_component=True, fill_holes=True))
    assert not refined[16, 16] and refined[6, 6] and refined.sum() == 100


def test_flip_tta_averages_the_flipped_back_predictions():
    images = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    plain = probabilities(ramp, images)
    tta = probabilities(ramp, images, tta=True)
    # identity, horizontal flip (flipped back: mirrored) and vertical flip (flipped back: unchanged here)
    assert plain[0, 0, 0, 0] < 0.1
    assert np.allclose(tta, (2 * plain + plain[..., ::-1]) / 3, atol=1e-6)


def test_rotation_tta_averages_the_turned_back_predictions_over_the_views():
    def pointwise(x):  # a per-pixel model commutes with every turn and mirror
        return x[:, :1] / 255 - 0.5

    images = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    plain = probabilities(ramp, images)
    turned = [np.rot90(plain, -k, axes=(-2, -1)) for k in range(4)]
    assert np.allclose(probabilities(ramp, images, rotations=True), sum(turned) / 4, atol=1e-6)
    all_eight = probabilities(ramp, images, tta=True, rotations=True)
    assert np.allclose(all_eight, (sum(turned) + sum(t[..., ::-1] for t in turned)) / 8, atol=1e-6)
    assert Refinements(tta=True, rotations=True).views == [(k, m) for m in (False, True) for k in range(4)]
    for tta in (False, True):
        assert np.allclose(
            probabilities(pointwise, images, tta=tta, rotations=True), probabilities(pointwise, images), atol=1e-6
        )


@pytest.fixture(scope="module")
def full_size_run(tmp_path_factory):
    """Synthetic 'full-size' images of different shapes: scoring at source resolution needs them."""
    root = tmp_path_factory.mktemp("full")
    data = write_dataset(root / "data", {"train": 6, "test": 3}, size=80, seed=4)
    test_images = sorted((data / "ISBI2016_ISIC_Part1_Test_Data").iterdir())
    for n, image in enumerate(test_images):  # make the test images non-square, each its own size
        mask = data / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{image.stem}_Segmentation.png"
        size = (100 + 20 * n, 70)
        Image.open(image).resize(size).save(image)
        Image.open(mask).resize(size, Image.NEAREST).save(mask)
    config = build_config(
        "model2-finetune",
        data=str(data),
        out=str(root / "run"),
        weights="none",
        image_size=32,
        epochs=1,
        batch_size=3,
        cache_dir=str(root / "cache"),
    )
    return fit(config, progress=False)


def test_evaluation_at_source_resolution_and_refinements(full_size_run, tmp_path):
    result = evaluate_checkpoint(
        full_size_run / "best.pt",
        out=tmp_path / "eval",
        source_resolution=True,
        refine=Refinements(tta=True, largest_component=True),
        progress=False,
    )
    assert result["refinements"] == "tta+largest_component"
    for key in ("metrics", "metrics_source_resolution"):
        m = result[key]
        assert set(m) >= {
            "iou_per_image",
            "dice_per_image",
            "accuracy_per_image",
            "sensitivity_per_image",
            "specificity_per_image",
            "thresholded_iou_per_image",
            "iou_worst_decile",
        }
        assert 0 <= m["thresholded_iou_per_image"] <= m["iou_per_image"] <= 1
    rows = (tmp_path / "eval" / "per_image.csv").read_text().splitlines()
    assert len(rows) == 4 and "iou_source" in rows[0]


def test_validation_split_scores_the_runs_own_validation_images(full_size_run, tmp_path):
    val_ids = json.loads((full_size_run / "split.json").read_text())["val"]
    result = evaluate_checkpoint(
        full_size_run, split="val", source_resolution=True, refine=Refinements(tta=True, rotations=True), progress=False
    )
    assert [row["id"] for row in result["per_image"]] == val_ids
    assert result["refinements"] == "tta+rotations"
    assert 0 <= result["metrics_source_resolution"]["iou_per_image"] <= 1
    elsewhere = tmp_path / "best.pt"
    shutil.copy(full_size_run / "best.pt", elsewhere)
    with pytest.raises(LesionsegError, match="split.json: not found"):
        evaluate_checkpoint(elsewhere, split="val", progress=False)
    (tmp_path / "split.json").write_text(json.dumps({"val": [*val_ids, "ISIC_9999999"]}))
    with pytest.raises(
        LesionsegError, match=r"split.json: validation image ISIC_9999999 is not in .*'s training split"
    ):
        evaluate_checkpoint(elsewhere, split="val", progress=False)


def test_evaluate_val_without_a_split_file_is_one_line_naming_it(full_size_run, tmp_path, capsys):
    from lesionseg.cli import main

    shutil.copy(full_size_run / "best.pt", tmp_path / "best.pt")
    assert main(["evaluate", str(tmp_path / "best.pt"), "--split", "val", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "split.json") in err and "not found" in err


def test_evaluate_scores_exactly_the_masks_predict_writes(full_size_run, tmp_path):
    """One pipeline: the per-image Jaccard evaluate reports at the stored size is that of predict's mask files."""
    from lesionseg.cli import main
    from lesionseg.images import inspect_mask
    from lesionseg.train.config import read_config

    data = Path(read_config(full_size_run / "config.yaml").data)
    options = ["--tta", "--largest-component", "--fill-holes"]
    refine = Refinements(tta=True, largest_component=True, fill_holes=True)
    scored = evaluate_checkpoint(full_size_run, source_resolution=True, refine=refine, progress=False)["per_image"]
    images = data / "ISBI2016_ISIC_Part1_Test_Data"
    assert (
        main(
            [
                "predict",
                str(images),
                "--checkpoint",
                str(full_size_run),
                "--out",
                str(tmp_path),
                "--no-progress",
                *options,
            ]
        )
        == 0
    )
    for row in scored:
        predicted = np.asarray(Image.open(tmp_path / "masks" / f"{row['id']}.png")) > 128
        truth, _ = inspect_mask(data / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{row['id']}_Segmentation.png")
        assert predicted.shape == truth.shape
        jaccard = (predicted & truth).sum() / (predicted | truth).sum()
        assert abs(jaccard - row["iou_source"]) < 1e-9
