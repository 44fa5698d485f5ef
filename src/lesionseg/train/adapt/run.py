"""`lesionseg adapt` end to end: read the clinic once, cross-validate the fine-tune, decide, write the files.

Every adaptation starts from the released model unless `--from` names another (adapting again with 50 masks
after 25 does not stack a second fine-tune on the first), and the report says which.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from lesionseg.errors import LesionsegError
from lesionseg.files import shown, write_atomically
from lesionseg.segment.pipeline import offset_border
from lesionseg.train.adapt.calibrate import calibration
from lesionseg.train.adapt.clinic import load_clinic
from lesionseg.train.adapt.decide import LOSS_MARGIN, cross_validate
from lesionseg.train.adapt.files import prepare_out, starting_model, write_models
from lesionseg.train.adapt.finetune import finetune
from lesionseg.train.config import AdaptRecipe

MIN_MASKS = 10  # below this, five folds of two images cannot tell a gain from noise


def write_report(out: Path, report: dict) -> Path:
    text = json.dumps(report, indent=1, allow_nan=False)
    return write_atomically(out / "adapt.json", lambda handle: handle.write(text.encode()), "adapt report")


def summary_line(report: dict) -> str:
    """One line: what adapting did, from which model, measured on the clinic's held-out masks."""
    before, after = report["jaccard_before"], report["jaccard_after"]
    border = f"threshold {report['threshold']:.3f}, outline offset {report['border_offset']:+.2f} of the radius"
    finetune_gain = report["gains"]["finetune"]
    why_not_finetune = (
        f"the fine-tune lost more than {LOSS_MARGIN}"
        if finetune_gain < -LOSS_MARGIN
        else f"the fine-tune gained {finetune_gain:+.3f}, not more than the border's "
        f"{report['gains']['border']:+.3f} by {LOSS_MARGIN}"
    )
    what = {
        "start": f"kept the starting model (cross-validated, the fine-tune and a refitted border each lost more "
        f"than {LOSS_MARGIN})",
        "border": f"border refitted, {border} ({why_not_finetune})",
        "finetune": f"fine-tuned, {border}",
    }[report["chosen"]]
    return (
        f"adapted {report['started_from']} on {report['masks']} masks ({report['judged']} corrected): {what}; "
        f"cross-validated Jaccard on the corrected masks {before:.3f} -> {after:.3f} (gain {after - before:+.3f})"
    )


def run_adapt(
    data: str | Path,
    out: str | Path,
    start: str | Path | None = None,
    recipe: AdaptRecipe = AdaptRecipe(),
    progress=None,
    overwrite: bool = False,
) -> dict:
    """Adapt `start` (the released model by default) to the clinic in `data`; write OUT/model.onnx (and its int8
    twin when it stays within 0.005), OUT/model.pt, OUT/adapt.json; return the report."""
    began = time.perf_counter()
    out = prepare_out(Path(out), overwrite)
    model, config, source = starting_model(start)
    clinic = load_clinic(data, config.image_size)
    if len(clinic.ids) < MIN_MASKS:
        raise LesionsegError(f"{shown(data)}: {len(clinic.ids)} image/mask pairs; adapt needs at least {MIN_MASKS}")
    if not clinic.corrected.any():
        raise LesionsegError(
            f"{shown(data)}: all {len(clinic.ids)} masks were accepted as the model drew them; there is no "
            "correction to learn from (correct a few masks in the review page first)"
        )
    verdict = cross_validate(model, clinic, config.threshold, recipe, progress)
    truth = verdict.per_image[verdict.chosen]
    oof = np.stack([offset_border(p, verdict.border_offset) for p in verdict.out_of_fold_maps])
    quality_report = calibration(source.quality, oof, verdict.threshold, truth)
    if verdict.chosen == "finetune":
        if progress:
            progress("the final fine-tune on every mask")
        final = finetune(model, clinic.images, clinic.masks, recipe)
    else:
        final = model
    judged = verdict.judged
    report = {
        "data": str(data),
        "started_from": source.version,
        "started_from_name": source.name,
        "masks": len(clinic.ids),
        "judged": int(judged.sum()),
        "chosen": verdict.chosen,
        "threshold": verdict.threshold,
        "border_offset": verdict.border_offset,
        "jaccard_before": float(verdict.per_image["start"][judged].mean()),
        "jaccard_after": float(truth[judged].mean()),
        "gains": {name: verdict.gain(name) for name in ("border", "finetune")},
        "gain_interval": list(verdict.interval(verdict.chosen if verdict.chosen != "start" else "finetune")),
        "loss_margin": LOSS_MARGIN,
        "per_image": {
            "ids": clinic.ids,
            "corrected": clinic.corrected.tolist(),
            **{name: values.tolist() for name, values in verdict.per_image.items()},
        },
        "quality": quality_report,
        "recipe": asdict(recipe),
    }
    if progress:
        progress("writing the model files")
    tuned = replace(config, threshold=verdict.threshold)
    report["files"] = write_models(out, final, tuned, source, source.quality, report, clinic)
    report["seconds"] = time.perf_counter() - began
    write_report(out, report)
    return report
