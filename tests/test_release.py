"""The files that ship are the release that release.json, the model card and tools/release.py describe."""

from __future__ import annotations

import json
import re

from conftest import ROOT, load_script
from lesionseg.files import sha256_of
from lesionseg.segment.predictors import OnnxPredictor, released_model


def shipped_release() -> tuple[dict, float]:
    """release.json beside the shipped model, and the test Jaccard it records for the file that ships."""
    release = json.loads((released_model().parent / "release.json").read_text())
    return release, release["scores"][release["weights_storage"]]["plain"]["iou_per_image"]


def test_the_shipped_files_carry_the_version_and_scores_release_json_records():
    release, recorded = shipped_release()
    assert release["version"] == load_script("tools", "release").VERSION
    shipped, int8 = OnnxPredictor(released_model()), OnnxPredictor(released_model("int8"))
    assert shipped.version == f"v{release['version']}" and int8.version == f"{shipped.version}, int8"
    assert (
        release["bytes"] == released_model().stat().st_size
        and release["int8"]["bytes"] == released_model("int8").stat().st_size
    )
    assert shipped.metadata["test_jaccard"] == f"{recorded:.4f}"
    assert shipped.quality is not None and int8.quality is not None  # the refitted estimate travels in both files


def test_the_model_card_names_the_shipped_files_and_their_version():
    card = (ROOT / "MODEL_CARD.md").read_text()
    release, recorded = shipped_release()
    assert re.match(rf"# Model card: lesionseg U-Net v{release['version']}\n", card)
    for precision in ("float32", "int8"):
        assert sha256_of(released_model(precision)) in card
    assert f"**{recorded:.4f}**" in card


def test_the_shipped_click_model_is_the_one_release_json_and_the_model_card_describe():
    """The click model ships beside the release (the review page's click tool and `refine` need nothing else), and
    release.json's record of it (bytes, sha256, scores) is of that very file."""
    from lesionseg.segment.clicks import ClickModel, click_model_path

    release, _ = shipped_release()
    path = released_model().with_name(release["clicks"]["file"])
    assert click_model_path() == path and path.stat().st_size == release["clicks"]["bytes"]
    assert sha256_of(path) == release["clicks"]["sha256"] and ClickModel(path).version == release["clicks"]["version"]
    assert release["clicks"]["sha256"] in (ROOT / "MODEL_CARD.md").read_text()
    step = release["clicks"]["version"].split(",")[0].removeprefix("step ")
    assert release["clicks"]["training"].endswith(f"--steps {step}")  # the recipe's length is the file's own
    assert {"noc@90", "unreached@90", "jaccard_after_3"} <= set(next(iter(release["clicks"]["scores"].values())))
