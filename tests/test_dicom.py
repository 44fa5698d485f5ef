"""DICOM in (dermoscopy and VL photographic images, read wherever an image is read) and DICOM Segmentation out;
every file built here with pydicom from the sample images, no downloads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionseg.cli import main

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid  # noqa: E402

DERMOSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.7"
SAMPLE = Path(__file__).resolve().parents[1] / "src/lesionseg/sample/ISBI2016_ISIC_Part1_Test_Data"


def dicom_bytes(pixels: np.ndarray, jpeg: bool = False, minimal: bool = False, **attributes) -> bytes:
    """A Part 10 file of one RGB frame: explicit little endian, or baseline JPEG (YBR_FULL_422) inside."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = attributes.pop("SOPClassUID", DERMOSCOPY)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = attributes.pop("TransferSyntaxUID", JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "XC"
    if not minimal:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P1", "19700101", "F"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = (
            "20260101",
            "",
            "",
            "1",
            "",
        )
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation, ds.PlanarConfiguration = 0, 0
    if jpeg:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
        ds.PhotometricInterpretation, ds.PixelData = "YBR_FULL_422", encapsulate([buffer.getvalue()])
    else:
        ds.PhotometricInterpretation, ds.PixelData = "RGB", pixels.tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def sample_pixels(n: int = 0) -> np.ndarray:
    return np.asarray(Image.open(sorted(SAMPLE.iterdir())[n]).convert("RGB"))


def rows_by_name(out: Path) -> dict[str, dict]:
    return {Path(row["file"]).name: row for row in json.loads((out / "predictions.json").read_text())}


def test_a_dicom_image_segments_as_its_png_does_and_its_seg_reads_back(tmp_path):
    pixels = sample_pixels()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(pixels).save(photos / "as_png.png")
    (photos / "scan0001").write_bytes(dicom_bytes(pixels, PixelSpacing=[0.02, 0.02]))  # no suffix: known by content
    (photos / "baseline.dcm").write_bytes(dicom_bytes(pixels, jpeg=True, minimal=True))
    out = tmp_path / "out"
    assert main(["predict", str(photos), "--out", str(out), "--no-progress", "--dicom-seg"]) == 0
    rows = rows_by_name(out)
    png_mask = np.asarray(Image.open(out / rows["as_png.png"]["mask"]))
    dcm_mask = np.asarray(Image.open(out / rows["scan0001"]["mask"]))
    assert np.array_equal(png_mask, dcm_mask)  # the same pixels, the same mask, pixel for pixel
    source = pydicom.dcmread(photos / "scan0001")
    row = rows["scan0001"]
    assert row["sop_instance_uid"] == source.SOPInstanceUID and row["study_instance_uid"] == source.StudyInstanceUID
    assert row["pixel_mm"] == pytest.approx(0.02) and row["area_mm2"] == pytest.approx(
        row["lesion_pixels"] * 0.0004, rel=1e-3
    )
    assert rows["as_png.png"]["dicom_seg"] is None and rows["as_png.png"]["dicom_seg_skipped"] == "not a DICOM image"

    seg = hd.seg.segread(out / row["dicom_seg"])
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    assert (
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    read_back = np.asarray(seg.pixel_array).reshape(png_mask.shape) > 0
    assert np.array_equal(read_back, png_mask > 127)
    assert "lesionseg" in str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName)
    minimal = rows["baseline.dcm"]  # a source without the type-2 patient attributes still gets its SEG
    assert minimal["dicom_seg"] and hd.seg.segread(out / minimal["dicom_seg"]).PatientID == ""
    jpeg_mask = np.asarray(Image.open(out / minimal["mask"])) > 127
    assert (jpeg_mask == (png_mask > 127)).mean() > 0.99  # the JPEG inside is lossy, the outline nearly the same

    assert main(["predict", str(photos), "--out", str(out), "--no-progress", "--dicom-seg"]) == 0  # resumes
    assert main(["predict", str(photos), "--out", str(tmp_path / "o2"), "--no-progress", "--pixel-size", "0.05"]) == 0
    assert rows_by_name(tmp_path / "o2")["scan0001"]["pixel_mm"] == 0.05  # the user's word over the file's


def test_hostile_dicom_is_one_line_each_and_the_rest_is_segmented(tmp_path, capsys):
    pixels = sample_pixels(1)[:64, :64].copy()
    folder = tmp_path / "in"
    folder.mkdir()
    good = dicom_bytes(pixels)
    (folder / "good.dcm").write_bytes(good)
    (folder / "truncated.dcm").write_bytes(good[: len(good) // 2])
    no_pixels = Dataset()
    no_pixels.file_meta = FileMetaDataset()
    no_pixels.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    no_pixels.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    no_pixels.SOPClassUID, no_pixels.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    buffer = io.BytesIO()
    no_pixels.save_as(buffer, enforce_file_format=True)
    (folder / "report.dcm").write_bytes(buffer.getvalue())
    (folder / "bomb.dcm").write_bytes(dicom_bytes(pixels, Rows=60000, Columns=60000))
    (folder / "frames.dcm").write_bytes(dicom_bytes(pixels, NumberOfFrames=3))
    grey = dicom_bytes(pixels)
    grey_ds = pydicom.dcmread(io.BytesIO(grey))
    grey_ds.SamplesPerPixel, grey_ds.PhotometricInterpretation, grey_ds.BitsAllocated = 1, "MONOCHROME2", 16
    grey_ds.BitsStored, grey_ds.HighBit = 16, 15
    grey_ds.PixelData = np.zeros((64, 64), np.uint16).tobytes()
    del grey_ds.PlanarConfiguration
    buffer = io.BytesIO()
    grey_ds.save_as(buffer)
    (folder / "grey16.dcm").write_bytes(buffer.getvalue())
    (folder / "mpeg2.dcm").write_bytes(
        dicom_bytes(pixels, jpeg=True, TransferSyntaxUID="1.2.840.10008.1.2.4.100")  # MPEG-2: nothing here decodes it
    )
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--out", str(out), "--no-progress"]) == 1  # 1: some inputs were skipped
    said = capsys.readouterr().err
    assert list(rows_by_name(out)) == ["good.dcm"]
    for name, why in [
        ("truncated.dcm", "cannot"),
        ("report.dcm", "without pixel data"),
        ("bomb.dcm", "over the"),
        ("frames.dcm", "3 frames"),
        ("grey16.dcm", "16-bit MONOCHROME2"),
        ("mpeg2.dcm", "cannot decode the DICOM pixels"),
    ]:
        line = next(line for line in said.splitlines() if name in line)
        assert why in line, line
    assert "Traceback" not in said


def test_without_the_extra_a_dicom_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    import sys

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "scan.dcm").write_bytes(dicom_bytes(sample_pixels()[:32, :32].copy()))
    Image.fromarray(sample_pixels()[:32, :32]).save(photos / "plain.png")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    assert main(["predict", str(photos), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "pip install 'lesionseg[dicom]'" in capsys.readouterr().err
    assert list(rows_by_name(tmp_path / "o")) == ["plain.png"]


def test_serve_and_describe_read_dicom_too(tmp_path):
    from conftest import local_client
    from lesionseg.api import load_predictor
    from lesionseg.segment.serve import create_app

    pixels = sample_pixels(2)
    data = dicom_bytes(pixels, jpeg=True)
    reply = local_client(create_app(load_predictor())).post("/predict", files={"file": ("scan.dcm", data)})
    assert reply.status_code == 200 and reply.json()["width"] == pixels.shape[1]
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    (images / "scan.dcm").write_bytes(dicom_bytes(pixels))
    mask = np.zeros(pixels.shape[:2], np.uint8)
    mask[40:120, 60:160] = 255
    Image.fromarray(mask).save(masks / "scan.png")
    assert main(["describe", "--images", str(images), "--masks", str(masks), "--out", str(tmp_path / "d.csv")]) == 0
    assert "scan.dcm" in (tmp_path / "d.csv").read_text()
