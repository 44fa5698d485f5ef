"""predict's speed on DICOM files (baseline JPEG inside) against the very same JPEG bytes as .jpg files.

The DICOM files are built here with pydicom from the images of a folder (each JPEG re-encoded once, then the same
bytes written both as `<stem>.jpg` and encapsulated in `<stem>.dcm`), so the two runs decode identical pixels.
`lesionseg predict` runs as a whole process on each folder in turn (A B A B ...), the ratio taken pair by pair.
Stop anything else running on the machine while it times (docs: SIGSTOP background training).

    .venv/bin/python benchmarks/dicom_speed.py --images ../shared/data/isic2016-256/ISBI2016_ISIC_Part1_Test_Data \
        --count 100 --rounds 5 --out benchmarks/results/dicom_speed/isic-test-100.json
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from common import write_result


def build(images: list[Path], folder: Path) -> tuple[Path, Path]:
    """folder/jpeg/<stem>.jpg and folder/dicom/<stem>.dcm holding the same JPEG bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    jpeg, dicom = folder / "jpeg", folder / "dicom"
    jpeg.mkdir(parents=True)
    dicom.mkdir()
    for path in images:
        rgb = Image.open(path).convert("RGB")
        buffer = io.BytesIO()
        rgb.save(buffer, "JPEG", quality=92)
        (jpeg / f"{path.stem}.jpg").write_bytes(buffer.getvalue())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.7"  # Dermoscopic Photography Image Storage
        meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "XC"
        ds.Rows, ds.Columns = rgb.height, rgb.width
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 3, 8, 8, 7, 0
        ds.PlanarConfiguration, ds.PhotometricInterpretation = 0, "YBR_FULL_422"
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds.save_as(dicom / f"{path.stem}.dcm", enforce_file_format=True)
    return jpeg, dicom


def timed(folder: Path, out: Path) -> float:
    command = [sys.executable, "-m", "lesionseg", "predict", str(folder), "--out", str(out), "--no-progress"]
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.count]
    with tempfile.TemporaryDirectory() as work:
        jpeg, dicom = build(images, Path(work))
        timed(jpeg, Path(work) / "warm-j")
        timed(dicom, Path(work) / "warm-d")
        pairs = []
        for n in range(args.rounds):
            a, b = timed(dicom, Path(work) / f"d{n}"), timed(jpeg, Path(work) / f"j{n}")
            pairs.append({"dicom_s": a, "jpeg_s": b, "ratio": a / b})
            print(pairs[-1], flush=True)
    results = {
        "images": len(images),
        "size": list(Image.open(images[0]).size),
        "rounds": pairs,
        "median_dicom_s": statistics.median(p["dicom_s"] for p in pairs),
        "median_jpeg_s": statistics.median(p["jpeg_s"] for p in pairs),
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
    }
    print(results)
    if args.out:
        write_result(args.out, results)


if __name__ == "__main__":
    main()
