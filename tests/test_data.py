import os

import pytest
import torch
from PIL import Image

from lesionseg.errors import DataError
from lesionseg.train import augmentation
from lesionseg.train import data as data_module
from lesionseg.train.augmentation import EvalPreset, SegmentationDataset, TrainPreset
from lesionseg.train.data import (
    find_pairs,
    load_pairs,
    load_split,
    sample_data_dir,
    train_val_indices,
)


def test_official_layout_pairs_images_with_masks(tiny_data):
    pairs, problems = find_pairs(tiny_data, "train")
    assert len(pairs) == 10 and problems == []
    assert all(p.mask.name == f"{p.image.stem}_Segmentation.png" for p in pairs)
    assert len(find_pairs(tiny_data, "test")[0]) == 4


def test_plain_images_and_masks_layout(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir()
        Image.new("RGB", (40, 30)).save(tmp_path / split / "images" / "a.jpg")
        mask = Image.new("L", (40, 30))
        mask.paste(255, (10, 10, 20, 20))
        mask.save(tmp_path / split / "masks" / "a.png")
    assert [p.id for p in find_pairs(tmp_path, "test")[0]] == ["a"]
    split = load_split(tmp_path, "train", 32)
    assert split.source_sizes == [(40, 30)]


def test_embedded_sample_is_packaged():
    assert len(find_pairs(None, "train")[0]) == 24
    assert len(find_pairs(None, "test")[0]) == 8
    assert (sample_data_dir() / "README.md").read_text().count("CC BY-NC 4.0") == 1


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        find_pairs(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no test images found"):
        find_pairs(tmp_path, "test")


def test_resized_masks_stay_binary_and_images_uint8(tiny_data):
    split = load_split(tiny_data, "train", 32)
    assert split.images.shape == (10, 3, 32, 32) and split.images.dtype == torch.uint8
    assert split.masks.shape == (10, 1, 32, 32)
    assert set(split.masks.unique().tolist()) == {0, 1}
    assert split.source_sizes[0] == (48, 48)


def test_soft_masks_keep_the_border_fraction_and_threshold_to_the_binary_ones(tiny_data):
    binary, soft = load_split(tiny_data, "train", 32), load_split(tiny_data, "train", 32, soft=True)
    assert soft.masks.dtype == torch.float16 and soft.ids == binary.ids  # a cache entry of its own
    border = (soft.masks > 0) & (soft.masks < 1)
    assert border.any() and 0 <= soft.masks.min() and soft.masks.max() <= 1  # 48 -> 32 px cuts border pixels
    assert torch.equal((soft.masks >= 0.5).to(torch.uint8), binary.masks)
    assert set(load_split(tiny_data, "train", 32).masks.unique().tolist()) == {0, 1}


def test_cache_is_reused_and_invalidated_by_a_changed_file(tiny_data, monkeypatch):
    pairs, _ = find_pairs(tiny_data, "train")
    first = load_pairs(pairs, 32)
    decoded = []
    original = data_module._decode
    monkeypatch.setattr(data_module, "_decode", lambda *a: decoded.append(1) or original(*a))
    again = load_pairs(pairs, 32)
    assert decoded == [] and torch.equal(first.images, again.images)
    load_pairs(pairs, 64)  # another size is another cache entry
    assert decoded == [1]
    os.utime(pairs[0].image, ns=(1, 1))  # a touched source file invalidates the entry
    load_pairs(pairs, 32)
    assert decoded == [1, 1]


def test_train_val_split_is_seeded_disjoint_and_complete():
    train, val = train_val_indices(50, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val) == list(range(50))
    assert (train, val) == train_val_indices(50, 0.2, seed=3)
    assert val != train_val_indices(50, 0.2, seed=4)[1]


def test_augmentation_keeps_mask_aligned_with_its_image():
    """The image is drawn from its mask: after flip + rotation the lesion pixels must coincide."""
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[:, 10:30, 20:50] = 1  # an off-centre, asymmetric shape shows any misalignment
    image = (mask * 255).expand(3, -1, -1).clone()
    preset = TrainPreset(hflip=True, rotation=60)
    mean, std = (
        torch.tensor(augmentation.IMAGENET_MEAN)[:, None, None],
        torch.tensor(augmentation.IMAGENET_STD)[:, None, None],
    )
    changed = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out_mask = preset(image, mask)
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        lesion_in_image = ((out_image * std + mean)[0] > 0.5).float()
        disagreement = (lesion_in_image != out_mask[0]).float().mean().item()
        assert disagreement < 0.02, seed  # only the interpolated rim may differ
        changed += not torch.equal(out_mask, mask.float())
    assert changed >= 10  # the transforms really moved things


def test_zoom_keeps_the_mask_aligned_and_colour_changes_the_image_alone():
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[:, 10:30, 20:50] = 1
    image = (mask * 200 + 30).expand(3, -1, -1).clone()
    image[1] //= 2  # a coloured lesion, so saturation and hue have something to move
    plain, varied = TrainPreset(hflip=False, rotation=0), TrainPreset(hflip=False, rotation=20, scale=0.3, colour=0.4)
    areas, colours = set(), set()
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_mask = varied(image, mask)
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        areas.add(int(out_mask.sum()))
        colours.add(round(out_image[:, 20, 35].sum().item(), 3))
    assert len(areas) >= 6 and len(colours) >= 6  # zoom changes the lesion's area, colour its pixels
    assert torch.equal(plain(image, mask)[1], mask.float())
    torch.manual_seed(0)
    colour_only = TrainPreset(hflip=False, rotation=0, colour=0.4)(image, mask)
    assert torch.equal(colour_only[1], mask.float()) and not torch.equal(colour_only[0], plain(image, mask)[0])


def test_eval_preset_normalizes_with_imagenet_statistics():
    image = torch.full((3, 4, 4), 255, dtype=torch.uint8)
    out, mask = EvalPreset()(image, torch.ones(1, 4, 4, dtype=torch.uint8))
    expected = (1 - torch.tensor(augmentation.IMAGENET_MEAN)) / torch.tensor(augmentation.IMAGENET_STD)
    assert torch.allclose(out[:, 0, 0], expected)
    assert mask.dtype == torch.float32


def test_dataset_yields_float_pairs(tiny_data):
    dataset = SegmentationDataset(load_split(tiny_data, "train", 32), TrainPreset())
    image, mask = dataset[0]
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert image.dtype == mask.dtype == torch.float32
    assert type(image) is torch.Tensor and type(mask) is torch.Tensor


def test_a_looping_link_among_the_masks_is_named_not_fatal(tmp_path):
    from conftest import write_plain_pairs

    root = write_plain_pairs(tmp_path / "d", 3)
    os.symlink("loop.png", root / "masks" / "loop.png")
    pairs, problems = find_pairs(root, "train")
    assert len(pairs) == 3 and any("loop.png" in p and "loops" in p for p in problems)
