"""What `lesionseg adapt` reads (the starting model) and writes (OUT/model.onnx, its int8 twin, model.pt)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from lesionseg.errors import LesionsegError
from lesionseg.files import claim_output_folder, shown, write_atomically
from lesionseg.segment.pipeline import offset_border
from lesionseg.segment.predictors import BORDER_OFFSET_KEY, OnnxPredictor, released_model
from lesionseg.segment.quality import QualityModel
from lesionseg.train.adapt.clinic import Clinic, jaccard_table
from lesionseg.train.config import TrainConfig
from lesionseg.train.qualityfit import with_metadata

REPORT = "adapt.json"
WRITING = "writing"  # adapt.json's state while the model files are being replaced
WRITES = ("model.onnx", "model-int8.onnx", "model.pt")
INT8_TOLERANCE = 0.005  # mean Jaccard the int8 twin may lose against the float file on the clinic's masks


@dataclass
class Start:
    """The model adapting starts from: its file (ONNX, or None for a checkpoint), name, version and estimate."""

    onnx: Path | None
    name: str
    version: str
    quality: QualityModel | None


def prepare_out(out: Path, overwrite: bool = False) -> Path:
    """OUT created and checked before any work: a folder holding another command's files is refused, and so is
    an earlier adapt's finished model unless `overwrite` (a run killed while writing is its own: it is redone)."""
    out = claim_output_folder(out, REPORT, {"masks", "chosen"}, WRITES, "adapt")
    if (out / REPORT).exists() and not overwrite and json.loads((out / REPORT).read_text()).get("state") != WRITING:
        raise LesionsegError(
            f"{shown(out / REPORT)}: an earlier adapt's model is in this folder; pass --overwrite to replace it, "
            "or choose another --out"
        )
    return out


def mark_writing(out: Path, report: dict) -> None:
    """adapt.json says "writing" before the first model file is replaced: a run killed in the middle leaves a
    folder the next run knows as its own, never one it calls foreign."""
    marker = json.dumps({k: report[k] for k in ("data", "masks", "chosen")} | {"state": WRITING})
    write_atomically(out / REPORT, lambda handle: handle.write(marker.encode()), "adapt report")


def starting_model(source: str | Path | None) -> tuple[nn.Module, TrainConfig, Start]:
    """The released float model (None), another exported float file, or a checkpoint / run folder, in PyTorch."""
    from lesionseg.train.adapt.unfold import model_from_onnx

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
    change = report["jaccard_after"] - report["jaccard_before"]
    clinic = Path(report["data"]).name or "a clinic"
    if clinic == "review":  # OUT/review: the folder review saved into is named by its predict folder
        clinic = Path(report["data"]).resolve().parent.name
    return {
        "name": f"{start.name} adapted to {clinic} ({report['masks']} masks, {report['chosen']}, "
        f"cross-validated gain {change:+.3f})"[:200],
        "version": f"{start.version}, adapted"[:200],
        "threshold": str(config.threshold),
        BORDER_OFFSET_KEY: str(report["border_offset"]),
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


def clinic_jaccard(path: Path, clinic: Clinic) -> float:
    """Mean Jaccard of an exported file on every pair of the clinic, at the images' own size, at its own border."""
    predictor = OnnxPredictor(path)
    images = clinic.images.numpy()
    maps = np.concatenate([predictor(images[i : i + 32])[:, 0] for i in range(0, len(images), 32)])
    maps = np.stack([offset_border(p, predictor.border_offset) for p in maps])
    return float(jaccard_table(maps, clinic.truths, (predictor.threshold,)).mean())


def write_models(out: Path, model: nn.Module, config: TrainConfig, start: Start, quality, report: dict, clinic) -> dict:
    """OUT/model.pt and OUT/model.onnx (float16 weights, the adapt metadata, the recalibrated estimate); and
    OUT/model-int8.onnx where it stays within INT8_TOLERANCE of the float file on the clinic's masks. The clinic
    is the one adapt already read: its images calibrate the int8 twin and score both files."""
    import tempfile

    from lesionseg.train.export import export_onnx, float16_copy, int8_twin

    mark_writing(out, report)
    checkpoint = save_model(out / "model.pt", model, config, start)
    metadata = adapt_metadata(start, report, config)
    target = out / "model.onnx"
    files = {"onnx": str(target), "checkpoint": str(checkpoint)}
    with tempfile.TemporaryDirectory() as folder:  # one export serves the float16 file and the int8 twin
        fp32 = export_onnx(checkpoint, Path(folder) / "fp32.onnx", metadata=metadata, quick=True)
        if report["chosen"] in ("start", "border") and start.onnx is not None:
            with_metadata(start.onnx, metadata, quality, target)  # the same weights, byte for byte
        else:
            with_metadata(float16_copy(fp32, Path(folder) / "fp16.onnx"), {}, quality, target)
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime's calibration prints its progress
            int8 = int8_twin(fp32, Path(folder) / "int8.onnx", clinic.images.numpy())
        float_j, int8_j = clinic_jaccard(target, clinic), clinic_jaccard(int8, clinic)
        files["int8_vs_float"] = int8_j - float_j
        if abs(int8_j - float_j) <= INT8_TOLERANCE:
            with_metadata(int8, {}, quality, out / "model-int8.onnx")
            files["int8"] = str(out / "model-int8.onnx")
        else:
            (out / "model-int8.onnx").unlink(missing_ok=True)
    return files
