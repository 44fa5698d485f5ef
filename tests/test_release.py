"""The files that ship are the release that release.json, the model card and tools/release.py describe."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from lesionseg.files import sha256_of
from lesionseg.predictors import OnnxPredictor, released_model

ROOT = Path(__file__).resolve().parents[1]


def release_tool():
    spec = importlib.util.spec_from_file_location("release", ROOT / "tools" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_files_carry_the_version_and_scores_release_json_records():
    release = json.loads((released_model().parent / "release.json").read_text())
    assert release["version"] == release_tool().VERSION
    shipped, int8 = OnnxPredictor(released_model()), OnnxPredictor(released_model("int8"))
    assert shipped.version == f"v{release['version']}" and int8.version == f"{shipped.version}, int8"
    assert (
        release["bytes"] == released_model().stat().st_size
        and release["int8"]["bytes"] == released_model("int8").stat().st_size
    )
    recorded = release["scores"][release["weights_storage"]]["plain"]["iou_per_image"]
    assert shipped.metadata["test_jaccard"] == f"{recorded:.4f}"
    assert shipped.quality is not None and int8.quality is not None  # the refitted estimate travels in both files


def test_the_model_card_names_the_shipped_files_and_their_version():
    card = (ROOT / "MODEL_CARD.md").read_text()
    release = json.loads((released_model().parent / "release.json").read_text())
    assert re.match(rf"# Model card: lesionseg U-Net v{release['version']}\n", card)
    for precision in ("float32", "int8"):
        assert sha256_of(released_model(precision)) in card
    recorded = release["scores"][release["weights_storage"]]["plain"]["iou_per_image"]
    assert f"**{recorded:.4f}**" in card
