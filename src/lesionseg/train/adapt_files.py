"""What `lesionseg adapt` reads (the starting model) and writes (OUT/model.onnx, its int8 twin, model.pt)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from lesionseg.files import claim_output_folder
from lesionseg.segment.predictors import OnnxPredictor, released_model
from lesionseg.segment.quality import QualityModel
from lesionseg.train.clinic import jaccard_table, load_clinic
from lesionseg.train.config import TrainConfig
from lesionseg.train.qualityfit import with_metadata

REPORT = "adapt.json"
WRITES = ("model.onnx", "model-int8.onnx", "model.pt")
INT8_TOLERANCE = 0.005  # mean Jaccard the int8 twin may lose against the float file on the clinic's masks


@dataclass
class Start:
    """The model adapting starts from: its file (ONNX, or None for a checkpoint), name, version and estimate."""

    onnx: Path | None
    name: str
    version: str
    quality: QualityModel | None


def prepare_out(out: Path) -> Path:
    """OUT created and checked before any work; a folder holding another command's files is refused."""
    return claim_output_folder(out, REPORT, {"masks", "chosen"}, WRITES, "adapt")


def starting_model(source: str | Path | None) -> tuple[nn.Module, TrainConfig, Start]:
    """The released float model (None), another exported float file, or a checkpoint / run folder, in PyTorch."""
    from lesionseg.train.unfold import model_from_onnx

    if source is None or Path(source).suffix.lower() == ".onnx":
        path = Path(source) if source else released_model()
        model, config, predictor = model_from_onnx(path)
        return model, config, Start(path, predictor.name, predictor.version, predictor.quality)
    from lesionseg.train.checkpoint import load_model
    from lesionseg.train.predictor import checkpoint_version

    model, config, state = load_model(source)
    return model, config, Start(None, config.model_name, checkpoint_version(Path(source), state), None)


def adapt_metadata(start: Start, report: dict, config: TrainConfig) -> dict[str, str]:
    """What the adapted file says of itself, read by predict, serve, review and `lesionseg.load()`."""
    gain = {k: report[k] for k in ("jaccard_before", "jaccard_after", "gain_interval", "chosen", "masks")}
    return {
        "name": f"{start.name} adapted to {Path(report['data']).name or 'a clinic'} ({report['masks']} masks)"[:200],
        "version": f"{start.version}, adapted"[:200],
        "threshold": str(config.threshold),
        "adapted_from": start.version[:200],
        "adapt_masks": str(report["masks"]),
        "adapt_gain": json.dumps(gain),
    }


def save_model(path: Path, model: nn.Module, config: TrainConfig, start: Start) -> Path:
    """A checkpoint `train --init`, `evaluate` and `export` read: the adapted weights and the config they need."""
    from lesionseg.train.checkpoint import save_checkpoint

    save_checkpoint(
        {"model": model.state_dict(), "config": config.to_dict(), "epoch": 0, "info": {"adapted_from": start.version}},
        path,
    )
    return path


def clinic_jaccard(path: Path, data, threshold: float) -> float:
    """Mean Jaccard of an exported file on every pair of `data`, at the images' own size."""
    predictor = OnnxPredictor(path)
    clinic = load_clinic(data, predictor.image_size)
    maps = np.concatenate([predictor(clinic.images[i : i + 32].numpy())[:, 0] for i in range(0, len(clinic.ids), 32)])
    return float(jaccard_table(maps, clinic.truths, (threshold,)).mean())


def write_models(out: Path, model: nn.Module, config: TrainConfig, start: Start, quality, report: dict, data) -> dict:
    """OUT/model.pt and OUT/model.onnx (float16 weights, the adapt metadata, the recalibrated estimate); and
    OUT/model-int8.onnx where it stays within INT8_TOLERANCE of the float file on the clinic's masks."""
    from lesionseg.train.export import export_int8, export_onnx

    checkpoint = save_model(out / "model.pt", model, config, start)
    metadata = adapt_metadata(start, report, config)
    target = out / "model.onnx"
    if report["chosen"] in ("start", "threshold") and start.onnx is not None:
        with_metadata(start.onnx, metadata, quality, target)  # the same weights, byte for byte
    else:
        exported = export_onnx(checkpoint, out / ".model-export.onnx", fp16_weights=True, metadata=metadata)
        with_metadata(exported, {}, quality, target)
        exported.unlink()
    files = {"onnx": str(target), "checkpoint": str(checkpoint)}
    with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's calibration prints its progress
        int8 = export_int8(checkpoint, out / ".model-int8-export.onnx", calibration_data=data, metadata=metadata)
    float_j, int8_j = clinic_jaccard(target, data, config.threshold), clinic_jaccard(int8, data, config.threshold)
    files["int8_vs_float"] = int8_j - float_j
    if abs(int8_j - float_j) <= INT8_TOLERANCE:
        with_metadata(int8, {}, quality, out / "model-int8.onnx")
        files["int8"] = str(out / "model-int8.onnx")
    else:
        (out / "model-int8.onnx").unlink(missing_ok=True)
    int8.unlink()
    return files
