"""The benchmark scripts' bookkeeping: what they write must stay true when they are rerun."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_rescoring_keeps_the_wall_time_of_the_run_that_trained(tmp_path):
    unet_vs_smp = load_script("benchmarks", "unet_vs_smp")
    (tmp_path / "unet_vs_smp.json").write_text(json.dumps({"wall_seconds": 5518.9}))
    start = time.perf_counter() - 3.0
    kept = unet_vs_smp.wall_seconds(tmp_path, start, rescore_only=True)
    assert kept["wall_seconds"] == 5518.9
    assert 3.0 <= kept["rescore_seconds"] < 60
    trained = unet_vs_smp.wall_seconds(tmp_path, start, rescore_only=False)
    assert set(trained) == {"wall_seconds"} and 3.0 <= trained["wall_seconds"] < 60
    first = unet_vs_smp.wall_seconds(tmp_path / "new", start, rescore_only=True)
    assert set(first) == {"wall_seconds"}


def test_smp_comparison_starts_both_encoders_from_the_named_weights_file():
    unet_vs_smp = load_script("benchmarks", "unet_vs_smp")
    base = ["--data", "d", "--extra-data", "e"]
    for extra, start in (
        ([], []),
        (["--no-pretrained"], ["--no-pretrained"]),
        (["--weights", "w.pth"], ["--weights", "w.pth"]),
    ):
        args = unet_vs_smp.parse_args([*base, *extra])
        for arch in unet_vs_smp.ARCHS:
            command = unet_vs_smp.train_command(args, arch, Path("out"))
            assert [a for a in command if a in ("--weights", "w.pth", "--no-pretrained")] == start
    with pytest.raises(SystemExit):
        unet_vs_smp.parse_args([*base, "--no-pretrained", "--weights", "w.pth"])


def test_seed_combiner_refuses_runs_that_differ_in_more_than_the_seed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    seeds = load_script("benchmarks", "unet_vs_smp_seeds")
    config = {key: 1 for key in seeds.SAME}
    folders = []
    for name, seed, epochs in (("a", 0, 16), ("b", 1, 12), ("c", 0, 16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "unet_vs_smp.json").write_text(
            json.dumps({"config": {**config, "epochs": epochs, "seed": seed}})
        )
        folders.append(tmp_path / name)
    a, b, c = folders
    assert [s["config"]["seed"] for s in seeds.load_runs([a])] == [0]
    with pytest.raises(SystemExit, match="differs from .* in epochs, not only the seed"):
        seeds.load_runs([a, b])
    with pytest.raises(SystemExit, match=r"the same seed appears twice: \[0, 0\]"):
        seeds.load_runs([a, c])
    with pytest.raises(SystemExit, match="unet_vs_smp.json: not found"):
        seeds.load_runs([tmp_path / "missing"])


def test_variants_trains_scores_and_compares_each_variant(tmp_path):
    """benchmarks/variants.py end to end on tiny data: two variants, a table, a paired gap to the first."""
    import subprocess
    import sys

    from conftest import write_dataset

    data = write_dataset(tmp_path / "data", {"train": 8, "test": 3}, size=40)
    out = tmp_path / "out"
    common = f"--preset model2-finetune --data {data} --no-pretrained --epochs 1 --image-size 32 --batch-size 4"
    command = [
        sys.executable,
        str(BENCHMARKS / "variants.py"),
        "--out",
        str(out),
        "--common",
        common,
        "--variant",
        "base=",
        "--variant",
        "freeze-bn=--freeze-bn",
    ]
    subprocess.run(command, check=True, capture_output=True, cwd=BENCHMARKS.parent)
    written = json.loads((out / "variants.json").read_text())
    assert written["script"] == "variants" and len(written["git_commit"] or "x" * 40) == 40
    assert written["date"].startswith("20") and "cores" in written["machine"]["cpu"]
    summary = written["results"]["variants"]
    assert list(summary) == ["base", "freeze-bn"] and summary["freeze-bn"]["args"] == ["--freeze-bn"]
    assert "vs_first" in summary["freeze-bn"] and summary["freeze-bn"]["vs_first"]["images"] == 3
    assert (out / "freeze-bn" / "config.yaml").read_text().count("freeze_bn: true") == 1
    assert "| freeze-bn |" in (out / "variants.md").read_text()


def test_serve_load_reports_throughput_latency_and_memory(tiny_checkpoint, tmp_path):
    """benchmarks/serve_load.py against a real server on 127.0.0.1, bounded: 2 runs of 4 requests."""
    import subprocess
    import sys

    out = tmp_path / "load.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "serve_load.py"),
            "--synthetic",
            "64x48.png",
            "--clients",
            "1",
            "2",
            "--requests",
            "4",
            "--time-limit",
            "60",
            "--out",
            str(out),
            "--",
            "--checkpoint",
            str(tiny_checkpoint),
            "--backend",
            "torch",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = load_script("benchmarks", "common").read_result(out)
    assert result["image"] == "64x48 PNG" and result["server_peak_rss_mb"] > 50
    assert [run["clients"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["sent"] == 4 and run["errors"] == 0 and run["requests_per_s"] > 0
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["max_ms"]


def test_speed_peaks_name_their_source():
    """The theoretical fp32 peak follows the vector width and FMA pipes; the measured ones run."""
    speed = load_script("benchmarks", "speed")
    zen1 = {"cores": 2, "base_mhz": 2000.0, "isa": "avx2+fma", "family": "23", "model": "1"}
    assert speed.theoretical_peak_gflops(zen1)[0] == pytest.approx(64.0)  # 2 x 2 GHz x 16 FLOP/cycle
    zen4 = {**zen1, "family": "25", "model": "17", "isa": "avx512f"}
    peak, how = speed.theoretical_peak_gflops(zen4)
    assert peak == pytest.approx(256.0) and "avx512f" in how
    assert speed.theoretical_peak_gflops({**zen1, "base_mhz": None}) == (None, "clock unknown")
    assert speed.onnxruntime_matmul_gflops(128, 2) > 0.1


def test_refinements_are_chosen_on_validation_and_reported_on_test(tmp_path, monkeypatch):
    """benchmarks/refinements.py: every candidate scored on both splits, the choice read off validation only."""
    from conftest import write_dataset
    from lesionseg.train.config import build_config
    from lesionseg.train.training import fit

    data = write_dataset(tmp_path / "data", {"train": 9, "test": 3}, size=40)
    run = fit(
        build_config(
            "model2-finetune",
            data=str(data),
            out=str(tmp_path / "run"),
            weights="none",
            image_size=32,
            epochs=1,
            batch_size=3,
            val_fraction=0.34,
        ),
        progress=False,
    )
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    refinements = load_script("benchmarks", "refinements")
    result = refinements.choose(run)
    rows = result["candidates"]
    assert list(rows) == [r.name for r in refinements.CANDIDATES]
    best_on_validation = max(row["val"]["iou_per_image"] for row in rows.values())
    assert rows[result["chosen_on_validation"]]["val"]["iou_per_image"] == best_on_validation
    assert rows["plain"]["val_gain_over_plain"]["mean"] == 0 and rows["plain"]["test_gain_over_plain"]["mean"] == 0
    assert [row["views"] for row in rows.values()] == [1, 3, 3, 8, 8]
    assert "| tta+rotations+largest_component+fill_holes | 8 |" in refinements.table("run", result)


def test_device_name_says_which_cpu_generation_ran_the_benchmark():
    name = load_script("benchmarks", "unet_vs_smp").device_name()
    assert name.startswith("CPU: ") and name.endswith(" cores")
    if Path("/proc/cpuinfo").is_file():
        assert "(family " in name and " model " in name  # "AMD EPYC" alone covers machines 2x apart in speed


def test_paired_differences_of_evaluation_folders_against_the_first(tmp_path):
    paired = load_script("benchmarks", "paired")
    for name, values in (("a", [0.5, 0.6, 0.7]), ("b", [0.6, 0.7, 0.8]), ("c", [0.5, 0.6, 0.7])):
        (tmp_path / name).mkdir()
        rows = "\n".join(f"ISIC_{n},{v},{v - 0.1}" for n, v in enumerate(values))
        (tmp_path / name / "per_image.csv").write_text(f"id,iou_source,iou\n{rows}\n")
    folders = [
        paired.labelled(f"base={tmp_path / 'a'}"),
        paired.labelled(str(tmp_path / "b")),
        paired.labelled(f"same={tmp_path / 'c'}"),
    ]
    result = paired.differences(folders)
    assert list(result) == [f"{tmp_path / 'b'} - base", "same - base"]
    assert result[f"{tmp_path / 'b'} - base"]["mean"] == pytest.approx(0.1)
    assert result[f"{tmp_path / 'b'} - base"]["ours_better"] == 3 and result["same - base"]["mean"] == 0
    assert result[f"{tmp_path / 'b'} - base"]["ratio"] == pytest.approx(0.7 / 0.6)


def test_paired_averages_an_entry_over_its_seeds_before_pairing(tmp_path):
    paired = load_script("benchmarks", "paired")
    for name, values in (("base", [0.5, 0.5]), ("seed0", [0.6, 0.4]), ("seed1", [0.8, 0.6]), ("short", [0.5])):
        (tmp_path / name).mkdir()
        rows = "\n".join(f"ISIC_{n},{v}" for n, v in enumerate(values))
        (tmp_path / name / "per_image.csv").write_text(f"id,iou_source\n{rows}\n")
    folders = [
        paired.labelled(f"base={tmp_path / 'base'}"),
        paired.labelled(f"ours={tmp_path / 'seed0'},{tmp_path / 'seed1'}"),
    ]
    assert folders[1] == ("ours", [tmp_path / "seed0", tmp_path / "seed1"])
    means = paired.seed_means(folders)
    assert means["ours"]["per_folder"] == pytest.approx([0.5, 0.7]) and means["ours"]["mean"] == pytest.approx(0.6)
    assert means["ours"]["sd"] == pytest.approx(0.1414, abs=1e-4) and means["base"]["sd"] == 0
    gap = paired.differences(folders)["ours - base"]
    assert gap["mean"] == pytest.approx(0.1) and gap["ours_better"] == 1 and gap["ratio"] == pytest.approx(1.2)
    with pytest.raises(SystemExit, match="short: scored other images"):
        paired.differences([*folders, paired.labelled(f"bad={tmp_path / 'base'},{tmp_path / 'short'}")])


def test_ensemble_of_one_model_twice_is_that_model_and_members_must_share_validation(
    tiny_checkpoint, tmp_path, monkeypatch
):
    ensemble = load_script("benchmarks", "ensemble")
    from lesionseg.train.evaluation import Refinements, evaluate_checkpoint

    data = str(tiny_checkpoint.parents[1] / "data")
    twice, cached, pipeline = ensemble.ensemble_probabilities([str(tiny_checkpoint)] * 2, data, "test", Refinements())
    once, _, _ = ensemble.ensemble_probabilities([str(tiny_checkpoint)], data, "test", Refinements())
    assert np.allclose(twice, once) and pipeline.threshold == 0.5 and twice.shape == (len(cached), 1, 32, 32)
    alone = evaluate_checkpoint(tiny_checkpoint, data, "test", source_resolution=True, progress=False)
    monkeypatch.setattr(
        "sys.argv",
        [
            "ensemble.py",
            str(tiny_checkpoint),
            str(tiny_checkpoint),
            "--data",
            data,
            "--split",
            "test",
            "--out",
            str(tmp_path / "both"),
        ],
    )
    ensemble.main()
    rows = load_script("benchmarks", "paired").read_per_image(tmp_path / "both")
    assert [row["id"] for row in rows] == cached.ids == [row["id"] for row in alone["per_image"]]
    assert [row["iou_source"] for row in rows] == pytest.approx([row["iou_source"] for row in alone["per_image"]])
    for name, val in (("a", ["ISIC_1", "ISIC_2"]), ("b", ["ISIC_1", "ISIC_3"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "split.json").write_text(json.dumps({"val": val}))
    with pytest.raises(SystemExit, match="held out other validation images"):
        ensemble.validation_ids([str(tmp_path / "a"), str(tmp_path / "b")])
    assert ensemble.validation_ids([str(tmp_path / "a"), str(tmp_path / "a")]) == ["ISIC_1", "ISIC_2"]


def test_resolution_ceiling_is_perfect_at_the_stored_size_and_soft_masks_lift_it_below(tiny_data):
    ceiling = load_script("benchmarks", "resolution_ceiling").ceiling
    stored, smaller = ceiling(str(tiny_data), "test", 48), ceiling(str(tiny_data), "test", 32)
    assert stored["images"] == 4 and stored["binary_iou_per_image"] == pytest.approx(1.0)
    assert (
        smaller["binary_iou_per_image"] < 1.0 and smaller["binary_iou_worst_decile"] <= smaller["binary_iou_per_image"]
    )
    assert smaller["soft_iou_per_image"] >= smaller["binary_iou_per_image"]


def test_quality_fit_chooses_the_rows_that_rank_the_held_out_isic_images(tmp_path, monkeypatch):
    from lesionseg.segment.quality import FEATURES

    quality_fit = load_script("benchmarks", "quality_fit")
    rng = np.random.default_rng(0)

    def folder(name: str, count: int, signal: bool) -> Path:
        x = rng.random((count, len(FEATURES)))
        truth = 0.4 + 0.55 * x[:, 0] if signal else rng.random(count)  # only soft_jaccard carries the truth
        header = ",".join(["id", "iou_source", *(f"q_{f}" for f in FEATURES)])
        lines = [",".join([f"ISIC_{name}{n}", str(t), *map(str, row)]) for n, (t, row) in enumerate(zip(truth, x))]
        (tmp_path / name).mkdir()
        (tmp_path / name / "per_image.csv").write_text("\n".join([header, *lines]) + "\n")
        return tmp_path / name

    argv = [
        "quality_fit.py",
        "--release-val",
        str(folder("val", 40, True)),
        "--seed-val",
        str(folder("val2", 40, True)),
    ]
    argv += ["--release-external", str(folder("external", 200, False)), "--folds", str(folder("fold1", 100, True))]
    argv += ["--test", str(folder("test", 60, True)), "--out", str(tmp_path / "result.json")]
    monkeypatch.setattr(sys, "argv", argv)
    quality_fit.main()
    result = json.loads((tmp_path / "result.json").read_text())["results"]
    assert result["chosen"] != "as shipped: external"  # the external rows here carry no signal
    chosen = result["candidates"][result["chosen"]]
    assert chosen["held_out_isic_val"]["images"] == 80 and chosen["held_out_isic_val"]["spearman"] > 0.9
    assert chosen["test"]["spearman"] > result["candidates"]["as shipped: external"]["test"]["spearman"]


def test_adapt_benchmark_restyles_masks_by_the_asked_share_of_area():
    adapt = load_script("benchmarks", "adapt")
    yy, xx = np.mgrid[:200, :200]
    mask = (yy - 100) ** 2 + (xx - 100) ** 2 <= 50**2
    for share in (-0.15, 0.15):
        assert abs(adapt.restyled(mask, share).sum() / mask.sum() - (1 + share)) < 0.02
    assert (adapt.restyled(mask, -0.15) <= mask).all() and (adapt.restyled(mask, 0.15) >= mask).all()


def test_descriptor_agreement_is_the_shrout_fleiss_icc():
    descriptors = load_script("benchmarks", "descriptors")
    a = np.array([9.0, 6, 8, 7, 10, 6])
    assert descriptors.icc(a, a) == pytest.approx(1.0)
    assert descriptors.icc(a, a + 5) < descriptors.icc(a, a + 0.5) < 1  # absolute agreement: an offset costs


def test_clicks_benchmark_counts_clicks_names_its_model_and_the_release_ships_only_that_models_scores(
    tmp_path, monkeypatch
):
    """benchmarks/clicks.py on any folder of pairs records which click file answered (its sha256); tools/release.py
    --stage clicks ships that file beside the release with those scores, and refuses scores of another file."""
    from conftest import fake_click_model, write_plain_pairs
    from lesionseg.files import sha256_of

    data = write_plain_pairs(tmp_path / "pairs", 3, size=40)
    model = fake_click_model(tmp_path / "clicks.onnx")
    out = tmp_path / "scores.json"
    argv = ["clicks.py", "--images", str(data / "images"), "--masks", str(data / "masks"), "--model", str(model)]
    monkeypatch.setattr(sys, "argv", [*argv, "--start", "empty", "--out", str(out)])
    load_script("benchmarks", "clicks").main()
    result = load_script("benchmarks", "common").read_result(out)
    assert result["model"]["sha256"] == sha256_of(model) and result["summary"]["images"] == 3
    assert 0 <= result["summary"]["noc@90"] <= 20 and len(result["runs"][0]["scores"]) >= 2

    release = load_script("tools", "release")
    shipped = tmp_path / "release" / "lesionseg-unet.onnx"
    shipped.parent.mkdir()
    (shipped.parent / "release.json").write_text(json.dumps({"version": "3"}))
    monkeypatch.setattr(release, "SHIPPED", shipped)
    release.ship_clicks(model, [out])
    card = json.loads((shipped.parent / "release.json").read_text())
    assert card["version"] == "3" and card["clicks"]["sha256"] == sha256_of(shipped.with_name("lesionseg-clicks.onnx"))
    assert card["clicks"]["scores"]["scores"]["noc@90"] == result["summary"]["noc@90"]
    assert "--steps" not in card["clicks"]["training"]  # a file that does not say its step: none made up
    other = fake_click_model(tmp_path / "other.onnx", size=32)
    with pytest.raises(SystemExit, match="another click model"):
        release.ship_clicks(other, [out])
