"""The external validation set: whole lesions on one side, the same draw every time, folders every command reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

SHARED_HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-200"


def test_the_draw_keeps_every_lesion_on_one_side_and_is_repeatable():
    tool = load_script("tools", "external_split")
    lesions = {f"HAM_{n}": [f"ISIC_{n}_{k}" for k in range(1 + n % 3)] for n in range(200)}
    drawn = tool.draw(lesions, seed=3, min_images=50)
    assert drawn == tool.draw(lesions, seed=3, min_images=50) != tool.draw(lesions, seed=4, min_images=50)
    assert 50 <= len(drawn) < 53
    chosen = set(drawn)
    assert all(chosen.issuperset(images) or not chosen.intersection(images) for images in lesions.values())


def test_link_makes_folders_that_lesionseg_reads(tmp_path):
    from lesionseg.train.data import find_pairs

    tool = load_script("tools", "external_split")
    ham = tmp_path / "ham"
    (ham / "images").mkdir(parents=True)
    (ham / "masks").mkdir()
    for n in range(6):
        Image.fromarray(np.zeros((15, 20, 3), np.uint8)).save(ham / "images" / f"ISIC_{n}.jpg")
        Image.fromarray(np.zeros((15, 20), np.uint8)).save(ham / "masks" / f"ISIC_{n}.png")
    counts = tool.link(ham, tmp_path / "split", {"ISIC_1", "ISIC_4"})
    assert counts == {"external": 2, "train": 4}
    assert tool.link(ham, tmp_path / "split", {"ISIC_1", "ISIC_4"}) == counts  # a rerun keeps what is there
    external, _ = find_pairs(tmp_path / "split" / "external", "test")
    train, _ = find_pairs(tmp_path / "split" / "train", "train")
    assert [p.id for p in external] == ["ISIC_1", "ISIC_4"] and len(train) == 4
    (tmp_path / "other" / "train" / "images").mkdir(parents=True)
    (tmp_path / "other" / "train" / "images" / "ISIC_0.jpg").write_text("someone's file")
    with pytest.raises(SystemExit, match="already there and not a link"):
        tool.link(ham, tmp_path / "other", {"ISIC_1"})


@pytest.mark.skipif(not SHARED_HAM.is_dir(), reason="the shared HAM10000 copy is not on this machine")
def test_the_committed_split_is_the_draw_of_whole_lesions():
    tool = load_script("tools", "external_split")
    record = json.loads(tool.SPLIT.read_text())
    lesions = tool.lesions_of(SHARED_HAM / "metadata.csv")
    assert record["ids"] == tool.draw(lesions) and len(record["ids"]) >= 1000
    external = set(record["ids"])
    with open(SHARED_HAM / "metadata.csv", newline="") as table:
        side = {row["image_id"]: row["image_id"] in external for row in csv.DictReader(table)}
    assert all(len({side[i] for i in images}) == 1 for images in lesions.values())
