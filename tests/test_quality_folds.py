"""Out-of-fold rows for the quality estimate: every ISIC training image held out exactly once, by a model that
never saw it, and rows the fit reads."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script, write_dataset, write_plain_pairs


def fake_shared(root: Path) -> Path:
    write_dataset(root / "isic2016-256", {"train": 8})
    write_plain_pairs(root / "isic2018-extra-256", 6)
    return root


def names(folder: Path) -> set[str]:
    return {path.stem for path in folder.iterdir()}


def test_each_image_is_held_out_by_exactly_one_fold_and_trained_on_by_the_others(tmp_path):
    from lesionseg.train.data import find_pairs

    tool, shared = load_script("tools", "quality_folds"), fake_shared(tmp_path / "shared")
    every = names(shared / "isic2016-256" / "ISBI2016_ISIC_Part1_Training_Data") | names(
        shared / "isic2018-extra-256" / "images"
    )
    held_out = []
    for fold in range(3):
        folder = tmp_path / f"fold{fold}"
        count = tool.link_fold(shared, folder, fold, 3)
        test, train = names(folder / "test" / "images"), names(folder / "train" / "images")
        assert count == len(test) and test.isdisjoint(train) and test | train == every
        assert len(find_pairs(folder, "test")[0]) == len(test)  # masks found beside, as evaluate reads them
        held_out += sorted(test)
    assert sorted(held_out) == sorted(every)
    assert [tool.fold_of(name, 3) for name in sorted(every)] == [tool.fold_of(name, 3) for name in sorted(every)]


def test_out_of_fold_trains_each_fold_and_scores_it_on_its_held_out_images(tmp_path, monkeypatch):
    from lesionseg.train.qualityfit import read_rows

    tool, shared = load_script("tools", "quality_folds"), fake_shared(tmp_path / "shared")
    monkeypatch.setenv("LESIONSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        tool, "FOLD_ARGS", ["--preset", "model2-finetune", "--image-size", "32", "--epochs", "1", "--batch-size", "4"]
    )
    evaluations = tool.out_of_fold(shared, "none", tmp_path / "out", folds=2)
    seen = []
    for fold, folder in enumerate(evaluations):
        x, y, ids = read_rows(folder / "per_image.csv")
        assert set(ids) == names(tmp_path / "out" / f"fold{fold + 1}-of-2" / "data" / "test" / "images")
        assert x.shape == (len(ids), 10) and ((0 <= y) & (y <= 1)).all()
        seen += ids
    assert len(seen) == len(set(seen)) == 14
    stamp = evaluations[0].joinpath("per_image.csv").stat().st_mtime
    assert tool.out_of_fold(shared, "none", tmp_path / "out", folds=2) == evaluations  # a rerun redoes nothing
    assert evaluations[0].joinpath("per_image.csv").stat().st_mtime == stamp
