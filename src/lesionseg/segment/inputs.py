"""Which files predict segments: images named or found under named folders, each other entry named with its
reason, and one mask name per image."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lesionseg.errors import DataError
from lesionseg.files import same_stem, shown, unusable
from lesionseg.images import IMAGE_SUFFIXES, is_image_file
from lesionseg.segment.outputs import DICOM_SEG, MASKS, OVERLAYS, PROBABILITIES


@dataclass
class Inputs:
    """What a list of files and folders holds: images to segment, and every other entry named with its reason."""

    images: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unsupported: list[Path] = field(default_factory=list)


def walk_folder(folder: Path, skip: set[Path], found: Inputs) -> int:
    """Images under `folder` (recursively, symbolic links to folders not followed; the output folders `skip`
    left out, so a second run never segments the first one's masks); returns how many."""
    count = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if Path(root, d).resolve() not in skip)
        for name in sorted(names):
            path = Path(root, name)
            if not is_image_file(path):
                found.unsupported.append(path)
            elif reason := unusable(path):
                found.problems.append(f"{shown(path)}: {reason}")
            else:
                found.images.append(path)
                count += 1
    return count


def collect_inputs(inputs: list[str | os.PathLike], out: Path) -> Inputs:
    """Image files named, or found in named folders; everything that is not segmented is named with its reason."""
    found, skip = Inputs(), {(out / folder).resolve() for folder in ("", MASKS, OVERLAYS, PROBABILITIES, DICOM_SEG)}
    for item in map(Path, inputs):
        if item.is_dir():
            if not walk_folder(item, skip, found):
                found.problems.append(f"{shown(item)}: no image ({', '.join(IMAGE_SUFFIXES)}, DICOM) in this folder")
        elif reason := unusable(item):
            found.problems.append(f"{shown(item)}: {reason}")
        else:
            found.images.append(item)
    return found


def output_stems(images: list[Path]) -> list[str]:
    """Each image's stem, the id its mask is written under; two images with one id are refused, both named."""
    if pair := same_stem(images):
        raise DataError(
            f"{shown(pair[0])} and {shown(pair[1])} would both be written as {MASKS}/{shown(pair[1].stem)}.png; "
            "nothing was written: rename one, or segment them into separate --out folders"
        )
    return [shown(path.stem) for path in images]
