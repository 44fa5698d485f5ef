"""Files -> cached tensors -> augmented samples.

Data flows one way: `find_pairs` lists image/mask files, `load_pairs` checks, decodes and resizes
them once into a cache keyed by the source files and the size (the check's findings are cached with
them); `augmentation.py` turns the cached uint8 tensors into augmented samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lesionseg.errors import DataError
from lesionseg.files import same_stem, shown, unusable
from lesionseg.images import IMAGE_SUFFIXES, inspect_mask, is_image_file
from lesionseg.segment.pipeline import model_input, read_for_model

OFFICIAL_DIRS = {  # ISIC 2016 Task 1 archive names
    "train": ("ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth"),
    "test": ("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth"),
}
CACHE_VERSION = 3  # 3: images resized by the pipeline (Pillow), as predict resizes them


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path

    @property
    def id(self) -> str:
        return self.image.stem


@dataclass
class CachedSplit:
    """A split decoded once: uint8 images (N,3,S,S), {0,1} uint8 masks (N,1,S,S) (or, loaded with `soft`,
    float16 coverage in [0,1]), source sizes (W,H)."""

    ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    source_sizes: list[tuple[int, int]]
    skipped: list[str] = field(default_factory=list)  # "file: why" for each pair left out
    notes: list[str] = field(default_factory=list)  # "file: what was converted" for pairs kept
    fingerprint: str = ""  # the cache key: source files and size

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> CachedSplit:
        return CachedSplit(
            ids=[self.ids[i] for i in indices],
            images=self.images[indices],
            masks=self.masks[indices],
            source_sizes=[self.source_sizes[i] for i in indices],
        )


def sample_data_dir() -> Path:
    """The embedded sample (32 ISIC pairs at 256 px), used when no data folder is given."""
    return Path(str(resources.files("lesionseg").joinpath("sample")))


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    root = sample_data_dir() if data is None else Path(data)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    return root


def _split_dirs(root: Path, split: str) -> tuple[Path, Path]:
    """The image and mask folders of a split, in the official or a plain layout."""
    image_dir, mask_dir = OFFICIAL_DIRS[split]
    candidates = [(root / image_dir, root / mask_dir), (root / split / "images", root / split / "masks")]
    if split == "train":
        candidates.append((root / "images", root / "masks"))
    for images, masks in candidates:
        if images.is_dir():
            if not masks.is_dir():
                raise DataError(f"{masks}: mask folder not found (beside {images})")
            return images, masks
    tried = ", ".join(str(c[0].relative_to(root)) for c in candidates)
    raise DataError(f"{root}: no {split} images found (looked for {tried})")


def _mask_for(image: Path, mask_dir: Path, mask_names: set[str]) -> Path | None:
    for name in (f"{image.stem}_Segmentation.png", f"{image.stem}.png"):
        if name in mask_names:
            return mask_dir / name
    return None


def is_file(entry: os.DirEntry) -> bool:
    """A regular file, or a link to one; a broken or looping link is not (and is named where it matters)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def looping(entry: os.DirEntry) -> bool:
    """A symbolic link that cannot be followed (it loops, or points nowhere)."""
    return entry.is_symlink() and unusable(Path(entry.path)) is not None


def find_pairs(data: str | os.PathLike | None, split: str) -> tuple[list[Pair], list[str]]:
    """Every image of a split with its mask, sorted by id, and the files that cannot pair up."""
    images_dir, masks_dir = _split_dirs(resolve_data_dir(data), split)
    candidates = sorted(p for p in images_dir.iterdir() if is_image_file(p))
    problems = [f"{shown(p)}: {reason}" for p in candidates if (reason := unusable(p))]
    images = [p for p in candidates if not unusable(p)]
    if not images:
        raise DataError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in folder")
    refuse_duplicate_ids(images)
    listing = list(os.scandir(masks_dir))  # one listing, not a stat per image
    mask_names = {entry.name for entry in listing if is_file(entry)}
    problems += [f"{shown(entry.path)}: {unusable(Path(entry.path))}" for entry in listing if looping(entry)]
    pairs = []
    for image in images:
        mask = _mask_for(image, masks_dir, mask_names)
        if mask is None:
            problems.append(f"{image}: no mask in {masks_dir} ({image.stem}_Segmentation.png or {image.stem}.png)")
        else:
            pairs.append(Pair(image, mask))
    stems = {image.stem for image in images}
    for name in sorted(mask_names):
        mask = masks_dir / name
        if mask.suffix.lower() in IMAGE_SUFFIXES and mask.stem.removesuffix("_Segmentation") not in stems:
            problems.append(f"{mask}: mask without an image")
    return pairs, problems


def refuse_duplicate_ids(images: list[Path]) -> None:
    """Two images with one id (a.jpg and a.png) would share a mask: which one is meant cannot be guessed."""
    if pair := same_stem(images):
        raise DataError(f"{shown(pair[0])} and {shown(pair[1])}: two images with the id {shown(pair[1].stem)!r}")


def resize_image(image: Image.Image, size: int) -> torch.Tensor:
    """uint8 (3,S,S): the pipeline's one resize (the aspect ratio is not kept, as in the paper), so the model trains
    and is scored on exactly the inputs `predict` gives it."""
    return torch.from_numpy(model_input(image, size).copy())


def resize_mask(mask: np.ndarray, size: int, soft: bool = False) -> torch.Tensor:
    """{0,1} uint8 (1,S,S): bilinear on the 0/1 mask, then >= 0.5, so it stays binary. `soft`: float16 without the
    threshold, the fraction of each pixel the lesion covers, which keeps the border the resize would round off."""
    m = TF.resize(
        torch.from_numpy(mask).float()[None], [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
    )
    return m.clamp_(0, 1).to(torch.float16) if soft else (m >= 0.5).to(torch.uint8)


def _decode(pairs: list[Pair], size: int, soft: bool = False) -> CachedSplit:
    """Check and resize every pair; a bad pair is left out and named in `skipped`."""
    ids, images, masks, sizes, skipped, notes = [], [], [], [], [], []
    for pair in pairs:
        try:
            image, (width, height), image_notes = read_for_model(pair.image, str(pair.image), size)
            mask, mask_notes = inspect_mask(pair.mask)
            if mask.shape != (height, width):
                raise DataError(
                    f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}"
                )
        except DataError as exc:
            skipped.append(str(exc))
            continue
        notes += image_notes + mask_notes
        ids.append(pair.id)
        images.append(resize_image(image, size))
        masks.append(resize_mask(mask, size, soft))
        sizes.append((width, height))
    empty = torch.zeros(0, 1, size, size, dtype=torch.uint8)
    no_masks = empty.to(torch.float16 if soft else torch.uint8)
    return CachedSplit(
        ids,
        torch.stack(images) if images else empty.expand(0, 3, size, size).clone(),
        torch.stack(masks) if masks else no_masks,
        sizes,
        skipped,
        notes,
    )


def folder_listing(folder: Path) -> dict[str, str]:
    """ "resolved path:size:mtime" of every file in a folder, from one scandir: resolving and stat-ing
    10,000 files one by one took seconds on every run, before the cache could even be found."""
    resolved = folder.resolve()
    listing = {}
    for entry in os.scandir(folder):
        try:
            st = entry.stat()
        except OSError:  # a broken or looping link: never one of the pairs, which are all readable files
            continue
        listing[entry.name] = f"{resolved}{os.sep}{entry.name}:{st.st_size}:{st.st_mtime_ns};"
    return listing


def cache_key(pairs: list[Pair], size: int, soft: bool = False) -> str:
    """Changes whenever a source file (path, size, mtime), the target size or the kind of mask changes."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{size}{':soft' if soft else ''}".encode())
    listings: dict[Path, dict[str, str]] = {}
    for pair in pairs:
        for path in (pair.image, pair.mask):
            if path.parent not in listings:
                listings[path.parent] = folder_listing(path.parent)
            h.update(listings[path.parent][path.name].encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LESIONSEG_CACHE", Path.home() / ".cache" / "lesionseg"))


def load_pairs(
    pairs: list[Pair], size: int, cache_dir: str | os.PathLike | None = None, soft: bool = False
) -> CachedSplit:
    """Decode and resize `pairs` once; later calls with the same files, size and kind of mask read the cache."""
    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(pairs, size, soft)
    path = directory / f"pairs-{size}{'-soft' if soft else ''}-{key}.pt"
    if path.is_file():
        try:
            return CachedSplit(**torch.load(path, weights_only=True))
        except Exception as exc:  # a cache is only a copy: a damaged one is decoded again and rewritten
            print(
                f"lesionseg: {path}: damaged cache ({exc.__class__.__name__}), decoding the images again",
                file=sys.stderr,
            )
    split = _decode(pairs, size, soft)
    split.fingerprint = key
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(vars(split), tmp)
        os.replace(tmp, path)
    except OSError as exc:  # an unwritable cache only costs speed: say so and go on
        warnings.warn(f"{directory}: cache not written ({exc}); images will be decoded again next run")
    return split


def load_split(
    data: str | os.PathLike | None,
    split: str,
    size: int,
    cache_dir=None,
    strict: bool = False,
    quiet: bool = False,
    soft: bool = False,
) -> CachedSplit:
    """A checked, cached split. Bad pairs are skipped and listed on stderr; with `strict` the first stops the run.
    `soft`: masks as coverage (`resize_mask`), for training targets only; scores always use the binary masks."""
    pairs, problems = find_pairs(data, split)
    cached = load_pairs(pairs, size, cache_dir, soft)
    cached.skipped = problems + cached.skipped
    if strict and cached.skipped:
        more = f" (and {len(cached.skipped) - 1} more problems)" if len(cached.skipped) > 1 else ""
        raise DataError(f"{cached.skipped[0]}{more}")
    if not quiet:
        for line in cached.skipped:
            print(f"lesionseg: skipped {line}", file=sys.stderr)
        for line in cached.notes:
            print(f"lesionseg: note {line}", file=sys.stderr)
    if not len(cached):
        raise DataError(f"{resolve_data_dir(data)}: no usable {split} pairs ({len(cached.skipped)} skipped)")
    return cached


def join_splits(base: CachedSplit, extras: list[CachedSplit], names: list[str]) -> CachedSplit:
    """`base` followed by each extra split; an id already present means the same image twice: refused."""
    seen = set(base.ids)
    for extra, name in zip(extras, names):
        repeated = sorted(seen.intersection(extra.ids))
        if repeated:
            more = f" (and {len(repeated) - 1} more)" if len(repeated) > 1 else ""
            raise DataError(
                f"{name}: image {repeated[0]}{more} is already in the training data; extra data must hold other images"
            )
        seen.update(extra.ids)
    parts = [base, *extras]
    return CachedSplit(
        ids=[i for part in parts for i in part.ids],
        images=torch.cat([part.images for part in parts]),
        masks=torch.cat([part.masks for part in parts]),
        source_sizes=[size for part in parts for size in part.source_sizes],
        skipped=[line for part in parts for line in part.skipped],
        notes=[line for part in parts for line in part.notes],
        fingerprint="+".join(part.fingerprint for part in parts),
    )


def train_val_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded shuffle of the training split into train and validation (at least one of each)."""
    if n < 2:
        raise DataError(f"need at least 2 training images to hold out validation, found {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def write_split(
    path: Path, ids: list[str], train: list[int], val: list[int], seed: int, extra: list[str] | None = None
) -> None:
    split = {"seed": seed, "train": [ids[i] for i in train], "val": [ids[i] for i in val], "extra_train": extra or []}
    path.write_text(json.dumps(split, indent=1))
