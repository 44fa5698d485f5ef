import numpy as np
import pytest
import torch
from segmentation_models_pytorch import metrics as smp_metrics

from lesionseg.train.metrics import MetricAccumulator, confusion_counts, paired_difference, summarize

BIG = 20.0  # a logit far from the threshold


def as_logits(binary: torch.Tensor) -> torch.Tensor:
    return (binary.float() * 2 - 1) * BIG


def test_hand_computed_example():
    # image 1: 4 predicted, 3 true, 2 shared -> tp 2, fp 2, fn 1, tn 11 (4x4)
    pred = torch.zeros(2, 1, 4, 4)
    pred[0, 0, 0, :4] = 1
    gt = torch.zeros(2, 1, 4, 4)
    gt[0, 0, 0, :2] = 1
    gt[0, 0, 1, 0] = 1
    # image 2: perfect on 1 pixel
    pred[1, 0, 3, 3] = 1
    gt[1, 0, 3, 3] = 1
    counts = confusion_counts(as_logits(pred), gt)
    assert counts.tolist() == [[2, 2, 1, 11], [1, 0, 0, 15]]
    result = summarize(counts)
    assert result["iou_per_image"] == pytest.approx((2 / 5 + 1) / 2)
    assert result["iou_pooled"] == pytest.approx(3 / 6)
    assert result["dice_per_image"] == pytest.approx((4 / 7 + 1) / 2)
    assert result["dice_pooled"] == pytest.approx(6 / 9)
    assert result["sensitivity_pooled"] == pytest.approx(3 / 4)
    assert result["specificity_pooled"] == pytest.approx(26 / 28)
    assert result["accuracy_pooled"] == pytest.approx(29 / 32)


def test_empty_prediction_of_empty_mask_scores_one():
    empty = torch.zeros(1, 1, 8, 8)
    result = summarize(confusion_counts(as_logits(empty), empty))
    assert result["iou_per_image"] == 1.0 and result["dice_per_image"] == 1.0


def test_agrees_with_segmentation_models_pytorch_on_random_masks():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 1, 32, 32, generator=generator)
    target = (torch.rand(12, 1, 32, 32, generator=generator) > 0.6).long()
    accumulator = MetricAccumulator()
    for start in range(0, 12, 5):  # uneven batches must not change the result
        accumulator.update(logits[start : start + 5], target[start : start + 5])
    ours = accumulator.compute()
    tp, fp, fn, tn = smp_metrics.get_stats(torch.sigmoid(logits), target, mode="binary", threshold=0.5)
    for ours_key, fn_name in (
        ("iou", "iou_score"),
        ("dice", "f1_score"),
        ("accuracy", "accuracy"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
    ):
        metric = getattr(smp_metrics, fn_name)
        assert ours[f"{ours_key}_pooled"] == pytest.approx(metric(tp, fp, fn, tn, reduction="micro").item(), abs=1e-6)
        assert ours[f"{ours_key}_per_image"] == pytest.approx(
            metric(tp, fp, fn, tn, reduction="micro-imagewise").item(), abs=1e-6
        )
    assert len(accumulator.per_image()["iou"]) == 12


def test_isic2018_thresholded_jaccard_and_worst_decile():
    # per-image IoU 1.0, 0.6 (below 0.65: counts 0) and 0.8, built from counts (tp, fp, fn, tn)
    counts = torch.tensor([[10, 0, 0, 90], [6, 4, 0, 90], [8, 1, 1, 90]])
    result = summarize(counts)
    assert result["iou_per_image"] == pytest.approx((1 + 0.6 + 0.8) / 3)
    assert result["thresholded_iou_per_image"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert result["iou_worst_decile"] == pytest.approx(0.6)


def test_paired_difference_of_per_image_scores():
    rng = np.random.default_rng(0)
    theirs = {f"img{i}": float(v) for i, v in enumerate(rng.uniform(0.5, 0.9, 300))}
    ours = {k: v + 0.02 + float(rng.normal(0, 0.05)) for k, v in theirs.items()}
    gap = paired_difference(ours, theirs)
    assert gap["mean"] == pytest.approx(np.mean([ours[k] - theirs[k] for k in ours]))
    assert 0 < gap["ci95_low"] < gap["mean"] < gap["ci95_high"] < 0.04  # 300 images resolve a 0.02 gap
    assert gap["ours_better"] + gap["theirs_better"] == gap["images"] == 300
    same = paired_difference(theirs, theirs)
    assert same["mean"] == same["ci95_low"] == same["ci95_high"] == 0.0


def test_paired_difference_refuses_different_images():
    with pytest.raises(ValueError, match="different images"):
        paired_difference({"a": 0.5, "b": 0.6}, {"a": 0.5, "c": 0.6})


def test_scores_agree_with_the_isic_challenges_own_scorer(tmp_path):
    """isic-challenge-scoring (the ISIC challenges' scorer) and lesionseg score the same predicted mask files:
    8-bit single-channel, lesion = value > 128, predictions at the truth's size, names with ISIC_ + 7 digits."""
    from isic_challenge_scoring.segmentation import SegmentationScore
    from PIL import Image

    from lesionseg.images import inspect_mask
    from lesionseg.train.metrics import MetricAccumulator

    rng = np.random.default_rng(11)
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    accumulator = MetricAccumulator()
    for n in range(12):
        height, width = rng.integers(20, 90, 2)
        yy, xx = np.mgrid[:height, :width]
        truth = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2 < rng.uniform(0.05, 0.2) * height * width) * 255
        predicted = rng.choice([0, 127, 128, 129, 200, 255], (height, width), p=[0.5, 0.05, 0.1, 0.05, 0.05, 0.25])
        predicted[: height // 2] = truth[: height // 2]  # mostly right, so Jaccard spans both sides of 0.65
        if n == 0:
            predicted[:] = 0  # nothing predicted
        if n == 1:
            predicted[:] = truth[:] = 0  # no lesion, none predicted: every score's "freebie" case
        if n == 2:
            predicted[:] = 255  # all lesion
        name = f"ISIC_{1000000 + n:07d}"
        Image.fromarray(truth.astype(np.uint8)).save(truth_dir / f"{name}_Segmentation.png")
        Image.fromarray(predicted.astype(np.uint8)).save(pred_dir / f"{name}.png")
        ours = [
            torch.from_numpy(inspect_mask(d / f, allow_empty=True)[0])[None, None]
            for d, f in ((pred_dir, f"{name}.png"), (truth_dir, f"{name}_Segmentation.png"))
        ]
        accumulator.update_binary(*ours)
    official = SegmentationScore.from_dir(truth_dir, pred_dir).macro_average
    ours = accumulator.compute()
    pairs = {
        "jaccard": "iou_per_image",
        "dice": "dice_per_image",
        "accuracy": "accuracy_per_image",
        "sensitivity": "sensitivity_per_image",
        "specificity": "specificity_per_image",
        "threshold_jaccard": "thresholded_iou_per_image",
    }
    for theirs, mine in pairs.items():
        assert abs(official[theirs] - ours[mine]) < 1e-9, theirs
    assert 0 < official["threshold_jaccard"] < official["jaccard"] < 1  # the threshold was exercised
