"""Every kind of bad or odd input, crafted: reported by file name, skipped (or stopping with --strict)."""

import numpy as np
import pytest
from PIL import Image

from lesionseg.cli import main
from lesionseg.errors import DataError
from lesionseg.train.data import load_split

TRAIN_IMAGES = "ISBI2016_ISIC_Part1_Training_Data"
TRAIN_MASKS = "ISBI2016_ISIC_Part1_Training_GroundTruth"


def paths(root, n):
    image = sorted((root / TRAIN_IMAGES).iterdir())[n]
    return image, root / TRAIN_MASKS / f"{image.stem}_Segmentation.png"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


SKIPPED = {  # crafted damage -> what the report must say about which file
    "truncated image": (lambda image, mask: truncate(image), "image", "cannot read image"),
    "not an image": (lambda image, mask: image.write_bytes(b"hello"), "image", "not an image"),
    "truncated mask": (lambda image, mask: truncate(mask), "mask", "cannot read mask"),
    "missing mask": (lambda image, mask: mask.unlink(), "image", "no mask in"),
    "size mismatch": (
        lambda image, mask: Image.new("L", (10, 12), 255).save(mask),
        "mask",
        "mask is 10x12 but its image is 48x48",
    ),
    "empty mask": (lambda image, mask: Image.new("L", (48, 48), 0).save(mask), "mask", "empty mask"),
}


@pytest.mark.parametrize("case", sorted(SKIPPED))
def test_bad_pair_is_skipped_and_named(tiny_data, case, capsys):
    damage, culprit, message = SKIPPED[case]
    image, mask = paths(tiny_data, 2)
    damage(image, mask)
    split = load_split(tiny_data, "train", 32)
    assert len(split) == 9 and image.stem not in split.ids
    named = image if culprit == "image" else mask
    assert split.skipped == [s for s in split.skipped if s.startswith(f"{named}: ") and message in s]
    assert f"lesionseg: skipped {named}: " in capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(SKIPPED))
def test_strict_stops_with_one_line_naming_the_file(tiny_data, case):
    damage, culprit, message = SKIPPED[case]
    image, mask = paths(tiny_data, 2)
    damage(image, mask)
    with pytest.raises(DataError, match=message) as info:
        load_split(tiny_data, "train", 32, strict=True)
    assert str(image if culprit == "image" else mask) in str(info.value) and "\n" not in str(info.value)


def test_extra_mask_is_listed(tiny_data):
    extra = tiny_data / TRAIN_MASKS / "ISIC_orphan_Segmentation.png"
    Image.new("L", (48, 48), 255).save(extra)
    split = load_split(tiny_data, "train", 32)
    assert len(split) == 10 and split.skipped == [f"{extra}: mask without an image"]


def test_odd_formats_are_converted_and_noted(tiny_data):
    image0, _ = paths(tiny_data, 0)
    Image.open(image0).convert("L").save(image0.with_suffix(".png"))  # grayscale
    image0.unlink()
    image1, _ = paths(tiny_data, 1)
    Image.open(image1).convert("RGBA").save(image1.with_suffix(".png"))
    image1.unlink()
    image2, mask2 = paths(tiny_data, 2)
    sixteen = np.asarray(Image.open(image2).convert("L")).astype(np.uint16) * 257
    Image.fromarray(sixteen).save(image2.with_suffix(".png"))  # 16-bit grayscale
    image2.unlink()
    _, mask3 = paths(tiny_data, 3)
    soft = np.asarray(Image.open(mask3)).copy()
    soft[soft == 255] = 200
    soft[0, :4] = 90  # grey levels, as a JPEG-ish or anti-aliased mask would have
    Image.fromarray(soft).save(mask3)
    split = load_split(tiny_data, "train", 32)
    assert len(split) == 10 and split.skipped == []
    notes = "\n".join(split.notes)
    assert "L image converted to RGB" in notes and "RGBA image converted to RGB" in notes
    assert "16-bit" in notes and f"{mask3}: non-binary mask (3 levels)" in notes
    index = split.ids.index(image2.stem)  # the 16-bit image is scaled, not clipped to white
    assert 40 < split.images[index].float().mean() < 220


def test_exif_rotation_is_applied_so_the_mask_aligns(tmp_path):
    root = tmp_path / "exif"
    (root / TRAIN_IMAGES).mkdir(parents=True)
    (root / TRAIN_MASKS).mkdir()
    upright = np.full((40, 60, 3), 220, np.uint8)  # 60 wide, 40 tall, lesion on the left
    upright[10:30, 5:20] = 30
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 5:20] = 255
    for n in range(2):
        stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored sideways
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display"
        stored.save(root / TRAIN_IMAGES / f"ISIC_{n}.jpg", exif=exif, quality=95)
        Image.fromarray(mask).save(root / TRAIN_MASKS / f"ISIC_{n}_Segmentation.png")
    split = load_split(root, "train", 32)
    assert split.skipped == [] and split.source_sizes[0] == (60, 40)
    assert "EXIF orientation 6 applied" in split.notes[0]
    dark = (split.images[0].float().mean(0) < 128).float()
    assert (dark == split.masks[0, 0].float()).float().mean() > 0.95


def test_training_lists_skipped_files_and_strict_stops_it(tiny_data, tmp_path, capsys):
    image, _ = paths(tiny_data, 4)
    truncate(image)
    args = [
        "train",
        "--data",
        str(tiny_data),
        "--no-pretrained",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--no-progress",
    ]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    assert f"skipped {image}: cannot read image" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"{image}: cannot read image" in err and not (tmp_path / "strict" / "last.pt").exists()
    )
