import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import local_client
from lesionseg.cli import main
from lesionseg.segment.encoders import mask_png_8bit, outline, overlay
from lesionseg.segment.outputs import Extras
from lesionseg.segment.pipeline import Pipeline, Segmentation, as_fixed, describe, offset_border, to_own_size
from lesionseg.segment.prediction import run_predict
from lesionseg.train.predictor import TorchPredictor


def test_masks_come_back_at_each_images_own_resolution(tiny_checkpoint, photos, tmp_path):
    report = run_predict(
        Pipeline(TorchPredictor(tiny_checkpoint)),
        [photos],
        tmp_path / "out",
        batch_size=2,
        progress=False,
        extras=Extras(overlays="png"),
    )
    assert report.problems == [] and len(report.rows) == 3
    for row in report.rows:
        source = Image.open(row["file"])
        mask = Image.open(tmp_path / "out" / row["mask"])
        over = Image.open(tmp_path / "out" / row["overlay"])
        assert mask.size == over.size == source.size == (row["width"], row["height"])
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        assert row["lesion_pixels"] == int((np.asarray(mask) > 0).sum())
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [r["file"] for r in rows] == [
        r["file"] for r in json.loads((tmp_path / "out" / "predictions.json").read_text())
    ]


def test_describe_area_bbox_and_probability():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    probability = np.where(mask, 0.9, 0.1)
    row = describe("x.jpg", Segmentation(mask, as_fixed(probability)))
    assert row["lesion_pixels"] == 18 and row["lesion_fraction"] == pytest.approx(18 / 200)
    assert (row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"]) == (3, 2, 8, 4)
    assert row["mean_probability"] == pytest.approx(0.9)
    empty = describe("y.jpg", Segmentation(np.zeros((4, 4), bool), as_fixed(np.zeros((4, 4)))))
    assert empty["lesion_pixels"] == 0 and empty["bbox_x0"] is None and empty["mean_probability"] is None


def test_the_resize_back_in_fixed_point_is_pillows_float_bilinear():
    probability = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    as_float = Image.fromarray(probability, mode="F").resize((75, 41), Image.Resampling.BILINEAR)
    fixed = to_own_size(probability, 75, 41)
    assert fixed.dtype == np.int32 and fixed.shape == (41, 75)
    assert np.abs(Segmentation(fixed > 0, fixed).probability - np.asarray(as_float)).max() < 1e-6


def test_a_border_offset_moves_the_outline_by_a_share_of_the_radius_and_keeps_the_map_soft():
    rows, cols = np.indices((128, 128))
    probability = (1 / (1 + np.exp(np.hypot(rows - 64, cols - 64) - 40))).astype(np.float32)  # a soft disc, r = 40
    radius = lambda p: np.sqrt(np.count_nonzero(p >= 0.5) / np.pi)
    assert offset_border(probability, 0.0) is probability
    assert radius(offset_border(probability, -0.1)) == pytest.approx(36, abs=0.6)
    assert radius(offset_border(probability, 0.1)) == pytest.approx(44, abs=0.6)
    tighter = offset_border(probability, -0.1)
    assert 0.1 < tighter[64, 64 + 36] < 0.9  # the edge is still a slope, not a cliff
    assert offset_border(np.zeros((8, 8), np.float32), -0.3).max() == 0  # nothing to move


def test_the_mask_png_is_8_bit_grayscale_0_and_255(tmp_path):
    mask = np.random.default_rng(1).random((37, 53)) > 0.5
    (tmp_path / "m.png").write_bytes(mask_png_8bit(mask))
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "L" and image.size == (53, 37)
        assert np.array_equal(np.asarray(image), mask.astype(np.uint8) * 255)


def test_overlay_draws_only_the_outline():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    ring = outline(mask, 1)
    assert ring[10, 15] and ring[29, 20] and not ring[20, 20] and not ring[5, 5]
    image = Image.new("RGB", (40, 40), (10, 10, 10))
    pixels = np.asarray(overlay(image, mask))
    assert tuple(pixels[10, 15]) == (0, 255, 0) and tuple(pixels[20, 20]) == (10, 10, 10)


def test_probabilities_are_upsampled_from_the_model_grid(tiny_checkpoint):
    predictor = TorchPredictor(tiny_checkpoint)
    image = Image.new("RGB", (64, 48), (200, 150, 120))
    [result] = Pipeline(predictor).segment([image])
    assert result.probability.shape == (48, 64) and 0 <= result.probability.min() <= result.probability.max() <= 1
    assert np.array_equal(result.mask, result.probability >= predictor.threshold)


def test_unreadable_files_are_named_skipped_and_set_the_exit_status(tiny_checkpoint, photos, tmp_path, capsys):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    out = tmp_path / "out"
    status = main(
        [
            "predict",
            "--checkpoint",
            str(tiny_checkpoint),
            str(photos),
            str(tmp_path / "missing.png"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert "broken.jpg: not an image or damaged" in err
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 3


def test_clean_predict_exits_zero(tiny_checkpoint, photos, tmp_path):
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tiny_checkpoint),
                str(photos / "a.jpg"),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 0
    )


def test_channels_last_gives_the_same_probabilities(tiny_checkpoint):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    eager, cl = TorchPredictor(tiny_checkpoint), TorchPredictor(tiny_checkpoint, channels_last=True)
    assert np.allclose(eager(images), cl(images), atol=1e-5)


def test_python_api_segments_paths_pil_images_and_arrays(tiny_checkpoint, photos, tmp_path):
    import lesionseg
    from lesionseg.errors import DataError

    model = lesionseg.load(tiny_checkpoint)
    one = model.segment(photos / "a.jpg")
    assert one.mask.shape == one.probability.shape == (70, 70) and one.mask.dtype == bool
    assert np.array_equal(one.mask, one.probability >= 0.5)
    pil = Image.open(photos / "b.png")
    array = np.asarray(Image.open(photos / "c.jpeg").convert("RGB"))
    many = model.segment([str(photos / "a.jpg"), pil, array], batch_size=2)
    assert [r.mask.shape for r in many] == [(70, 70), (40, 40), (96, 96)]
    assert np.allclose(many[0].probability, one.probability, atol=1e-5)  # batch size may change the last bits
    # the same statistics `predict` writes, from the same code
    report = run_predict(model.pipeline, [photos / "a.jpg"], tmp_path / "out", progress=False)
    row = report.rows[0]
    assert one.stats == {k: row[k] for k in one.stats}  # beside them: the descriptors, the input's and model's identity
    assert one.descriptors == {k: row[k] for k in one.descriptors}
    assert many[2].stats["file"] == "image 2" and many[2].stats["width"] == 96
    with pytest.raises(DataError, match="image 0: an array must be HxWx3 uint8"):
        model.segment(np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="missing.jpg"):
        model.segment(tmp_path / "missing.jpg")


def test_the_readme_example_runs_with_the_released_model(tmp_path, monkeypatch):
    """The README's Python example, as written, on a sample image named lesion.jpg."""
    import re
    import shutil
    from pathlib import Path

    from lesionseg.train.data import sample_data_dir

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"## Segment\n.*?```python\n(.*?)```", readme, re.S).group(1)
    shutil.copy(sorted((sample_data_dir() / "ISBI2016_ISIC_Part1_Test_Data").glob("*.jpg"))[0], tmp_path / "lesion.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.mask.shape == (256, 256) and 0.01 < result.stats["lesion_fraction"] < 0.99
    assert namespace["model"].version.startswith("v")


def test_predict_and_serve_default_to_the_released_model(photos, tmp_path):

    from lesionseg.api import load_predictor
    from lesionseg.segment.serve import create_app

    assert main(["predict", str(photos), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png", "b.png", "c.png"]
    predictor = load_predictor()
    assert predictor.metadata["release"] and float(predictor.metadata["test_jaccard"]) > 0.8
    health = local_client(create_app(predictor)).get("/health").json()
    assert health["model"].startswith("lesionseg U-Net") and health["version"] == predictor.version


def test_flip_tta_for_users_is_the_average_evaluation_scores(tiny_checkpoint, photos, tmp_path):
    """`load(tta=True)`, `predict --tta` and `evaluate --tta` share one averaging: the mean of the flipped-back views."""
    import lesionseg
    from lesionseg.segment.pipeline import Refinements, model_input
    from lesionseg.train.evaluation import pipeline_for, probabilities_of

    plain, tta = lesionseg.load(tiny_checkpoint), lesionseg.load(tiny_checkpoint, tta=True)
    assert tta.name == plain.name and tta.version == plain.version
    predictor = plain.pipeline.predictor
    batch = np.stack(
        [model_input(Image.open(photos / name).convert("RGB"), predictor.image_size) for name in ("a.jpg", "c.jpeg")]
    )
    by_hand = (
        predictor(batch)
        + predictor(batch[..., ::-1].copy())[..., ::-1]
        + predictor(batch[..., ::-1, :].copy())[..., ::-1, :]
    ) / 3
    assert np.allclose(tta.pipeline.predictor(batch), by_hand, atol=1e-6)
    assert not np.allclose(predictor(batch), by_hand, atol=1e-4)  # an untrained model is far from flip-invariant
    evaluated = probabilities_of(pipeline_for(tiny_checkpoint, None, Refinements(tta=True))[0], torch.from_numpy(batch))
    assert np.allclose(evaluated, by_hand, atol=1e-5)
    assert (
        main(
            [
                "predict",
                str(photos / "a.jpg"),
                "--out",
                str(tmp_path / "out"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--tta",
                "--no-progress",
            ]
        )
        == 0
    )
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())[0]
    result = tta.segment(photos / "a.jpg")
    assert {k: written[k] for k in [*result.stats, *result.descriptors, "mask"]} == {
        **result.stats,
        **result.descriptors,
        "mask": "masks/a.png",
    }


def isic_folder(folder, count: int = 6, seed: int = 4):
    """Images named as the ISIC scorer expects (ISIC_ and 7 digits), with their truth masks beside."""
    from conftest import disc_pair

    rng = np.random.default_rng(seed)
    images, truth = folder / "images", folder / "truth"
    images.mkdir(parents=True)
    truth.mkdir()
    for n in range(count):
        image, mask = disc_pair(rng, int(rng.integers(40, 90)))
        Image.fromarray(image).save(images / f"ISIC_{1000000 + n:07d}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(truth / f"ISIC_{1000000 + n:07d}_Segmentation.png")
    return images, truth


def test_the_isic_scorer_reads_the_predict_folder_as_it_is(tiny_checkpoint, tmp_path):
    from isic_challenge_scoring.segmentation import SegmentationScore

    images, truth = isic_folder(tmp_path)
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), str(images), "--out", str(out), "--overlays"]
    assert main([*argv, "--no-progress"]) == 0
    score = SegmentationScore.from_dir(truth, out / "masks").macro_average
    assert 0 <= score["jaccard"] <= 1 and len(list((out / "masks").iterdir())) == 6


def test_a_killed_predict_resumes_and_redoes_only_what_is_missing(tiny_checkpoint, tmp_path, capsys):
    images, _ = isic_folder(tmp_path)
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), str(images), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    first = (out / "predictions.json").read_text()
    masks = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
    # as a kill would leave it: one mask never written, the journal's last line cut, no table yet
    (out / "masks" / "ISIC_1000003.png").unlink()
    journal = out / ".lesionseg-predict.jsonl"
    journal.write_text(journal.read_text().rsplit("\n", 3)[0][:-10])
    (out / "predictions.json").unlink()
    (out / "predictions.csv").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    # redone: the mask that was never written, the row cut short and the row never appended
    assert "segmented 3 image(s)" in said and "3 already done" in said
    assert (out / "predictions.json").read_text() == first
    assert {p.name: p.read_bytes() for p in (out / "masks").iterdir()} == masks
    assert main([*argv, "--overwrite"]) == 0 and "segmented 6 image(s)" in capsys.readouterr().out
    assert main([*argv, "--tta"]) == 2  # another model's options: not mixed into one folder
    assert "another model or options (refinements 'plain')" in capsys.readouterr().err


def test_jpeg_overlays_and_probability_maps_come_on_request_and_a_rerun_adds_them(tiny_checkpoint, tmp_path, capsys):
    images, _ = isic_folder(tmp_path)
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), str(images), "--out", str(out), "--no-progress"]
    assert main(argv) == 0 and not (out / "overlays").exists() and not (out / "probabilities").exists()
    capsys.readouterr()
    assert main([*argv, "--overlays", "jpg", "--probabilities"]) == 0
    assert "segmented 6 image(s)" in capsys.readouterr().out  # the files asked for were missing: redone
    for row in json.loads((out / "predictions.json").read_text()):
        mask = np.asarray(Image.open(out / row["mask"])) > 0
        with Image.open(out / row["overlay"]) as drawn:
            assert drawn.format == "JPEG" and drawn.size == (row["width"], row["height"])
        grey = np.asarray(Image.open(out / row["probability_map"]))
        assert grey.dtype == np.uint8 and grey.shape == mask.shape
        assert ((grey >= 128) == mask).mean() > 0.99  # the mask is this map at the threshold, 0.5
    assert main([*argv, "--overlays", "jpg", "--probabilities"]) == 0
    assert "6 already done" in capsys.readouterr().out


def test_two_shards_write_the_same_masks_and_rows_as_one_process(tiny_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    images, _ = isic_folder(tmp_path, count=9)
    command = [sys.executable, "-m", "lesionseg", "predict", "--checkpoint", str(tiny_checkpoint), str(images)]
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), str(images), "--out", str(tmp_path / "one"),
                 "--no-progress"]) == 0  # fmt: skip
    shards = [  # as torchrun starts them: RANK and WORLD_SIZE
        subprocess.Popen([*command, "--out", str(tmp_path / "two"), "--no-progress"],
                         env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    for shard in shards:
        assert shard.wait(300) == 0, shard.stderr.read()[-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "predictions.json").read_text() == (two / "predictions.json").read_text()
    assert (one / "predictions.csv").read_text() == (two / "predictions.csv").read_text()
    for mask in (one / "masks").iterdir():
        assert (two / "masks" / mask.name).read_bytes() == mask.read_bytes()
    (two / "predictions.csv").unlink()
    assert main(["merge", str(two)]) == 0
    assert (one / "predictions.csv").read_text() == (two / "predictions.csv").read_text()
