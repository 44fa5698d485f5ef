"""`predict --dicom-seg`: each DICOM image's mask as a DICOM Segmentation (highdicom), for the archive it came from.

One BINARY segment "lesion" (SNOMED CT: morphologically abnormal structure / lesion), the source image
referenced by its UIDs, the algorithm named with its version and the model file's hash. highdicom copies the
patient and study modules from the source and stops on a file that omits their type-2 attributes (a minimal but
valid file may): those are given empty values in a copy, as type 2 allows, so such a source still gets its SEG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lesionseg import dicom
from lesionseg.errors import DataError
from lesionseg.files import shown, write_atomically

FOLDER = "dicom-seg"
TYPE_2 = (  # patient and general study attributes a source may omit (type 2: present, possibly empty)
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
SERIES_NUMBER = 7301  # the SEG series' number: any fixed value readers can sort by


def highdicom_module(name: str):
    try:
        import highdicom
    except ImportError:
        raise DataError(f"{name}: {dicom.INSTALL}") from None
    return highdicom


def completed(source):
    """The source (as read: the file is never changed) with every missing type-2 attribute present and empty,
    and without its pixel spacing: highdicom would copy it into a Pixel Measures sequence that a photograph has no
    slice thickness for, and then refuses to read its own SEG back. The spacing stays in the source it references."""
    for keyword in TYPE_2:
        if keyword not in source:
            setattr(source, keyword, "")
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        if keyword in source:
            delattr(source, keyword)
    return source


def segmentation(source_path: Path, mask: np.ndarray, model: dict[str, Any]):
    """The SEG dataset of `mask` (bool, the image's own size) over the DICOM image at `source_path`."""
    name = shown(source_path)
    hd = highdicom_module(name)
    from pydicom.sr.codedict import codes

    source = completed(dicom.read_header(source_path, name))
    if mask.shape != (int(source.Rows), int(source.Columns)):
        raise DataError(
            f"{name}: the mask is {mask.shape[1]}x{mask.shape[0]}, the DICOM image {source.Columns}x{source.Rows}"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name="lesionseg",
        version=str(model.get("model_version") or "unknown")[:64],
        family=codes.DCM.ArtificialIntelligence,
        parameters={"model": str(model.get("model", ""))[:64], "model_sha256": str(model.get("model_sha256", ""))[:64]},
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    try:
        return hd.seg.Segmentation(
            source_images=[source],
            pixel_array=mask.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="lesionseg",
            manufacturer_model_name=str(model.get("model") or "lesionseg")[:64],
            software_versions=str(model.get("model_version") or "unknown")[:64],
            device_serial_number=str(model.get("model_sha256") or "none")[:16],
            series_description="lesion segmentation (lesionseg)",
        )
    except Exception as exc:  # highdicom refuses a source it cannot reference: one line, never a traceback
        raise DataError(
            f"{name}: cannot write its DICOM Segmentation ({exc.__class__.__name__}: {str(exc)[:160]})"
        ) from None


def write_segmentation(source_path: Path, mask: np.ndarray, model: dict[str, Any], target: Path) -> Path:
    """The SEG written atomically beside the PNG masks (a killed run leaves no half-written file)."""
    seg = segmentation(source_path, mask, model)
    return write_atomically(target, lambda handle: seg.save_as(handle, enforce_file_format=True), "DICOM Segmentation")
