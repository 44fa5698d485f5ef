"""predict's output folder: what it writes, what it has written, and how shards join.

    OUT/masks/<stem>.png            0/255 at the image's own size (what the ISIC scorer reads)
    OUT/overlays/<stem>.png|.jpg    with --overlays [png|jpg]: the outline on the image
    OUT/probabilities/<stem>.png    with --probabilities: the lesion probability, 0..255 at the image's own size
    OUT/predictions.json, .csv      one row per image, sorted by mask name, joined from every shard
    OUT/.lesionseg-predict[.K-of-N].jsonl
                                    each process's journal: a header (model and options), then one row per image
                                    appended as soon as its files are written, then a "done" line

    OUT/.lesionseg-predict[.K-of-N].lock, OUT/.lesionseg-folder.lock
                                    a shard's writer (held for the whole run) and the folder's planning and merging

The rules (docs/guide.md, "predict's output folder"):
- One writer per folder and shard at a time: a second is refused in one line naming the first. Shards of one
  count N write side by side; a run with another N waits until those are done.
- Every row names the model that made it (name, version, the file's SHA-256) and its input (path, size,
  modification time): a resume redoes an input that changed, `merge` refuses rows of two models, and an input
  whose mask name an earlier run wrote from another file is refused (cameras restart their numbering).
- `--overwrite`: this run's images are redone, and whatever another model or other options wrote into the
  folder is removed with its journal and rows, so that the folder holds one model's results.
- Nothing a user wrote is deleted (a file predict would write that no journal or table names is refused);
  nothing predict wrote is orphaned (a file it is about to write is named in its journal first).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionseg.errors import LesionsegError
from lesionseg.files import held_by_another, locked, shown, write_atomically
from lesionseg.machine import MAX_PROCESSES, process_rank

MASKS, OVERLAYS, PROBABILITIES, DICOM_SEG = "masks", "overlays", "probabilities", "dicom-seg"
OVERLAY_FORMATS = ("png", "jpg")
RECORD, TABLE = "predictions.json", "predictions.csv"
JOURNALS = ".lesionseg-predict*.jsonl"
FOLDER_LOCK = ".lesionseg-folder.lock"  # not a shard's: ".lesionseg-predict.lock" is the unsharded writer's
MODEL_KEYS = ("model", "model_version", "model_sha256")  # the columns that say which model made a row


def share_of(stem: str, count: int) -> int:
    """A stable split by file name into `count` shares: the same image lands in the same share on every machine
    and every run (predict's shards, the quality estimate's folds)."""
    digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Extras:
    """What predict writes beside each mask, only on request: full-size files cost more than the mask."""

    overlays: str | None = None  # "png" or "jpg" (a photo's outline as JPEG: a fraction of the time and size)
    probabilities: bool = False
    dicom_seg: bool = False  # a DICOM Segmentation for each DICOM input (segment/dicomseg.py)

    def names(self, stem: str) -> dict[str, str]:
        """This image's extra files, by the row key that names each."""
        names = {}
        if self.overlays:
            names["overlay"] = f"{OVERLAYS}/{stem}.{self.overlays}"
        if self.probabilities:
            names["probability_map"] = f"{PROBABILITIES}/{stem}.png"
        if self.dicom_seg:
            names["dicom_seg"] = f"{DICOM_SEG}/{stem}.dcm"
        return names

    def folders(self) -> list[str]:
        asked = [(OVERLAYS, self.overlays), (PROBABILITIES, self.probabilities), (DICOM_SEG, self.dicom_seg)]
        return [MASKS, *(folder for folder, wanted in asked if wanted)]


@dataclass(frozen=True)
class Shard:
    """This process's share of the inputs: index 0..count-1 (the command line says K/N with K from 1)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """`K/N` from --shard; else torchrun's RANK / WORLD_SIZE; else the whole input. ASCII digits only."""
        if text is None:
            rank, world, _ = process_rank()
            return cls(rank, world)
        match = re.fullmatch(r"([0-9]{1,6})/([0-9]{1,6})", text)
        if not match or not 1 <= int(match[1]) <= int(match[2]) <= MAX_PROCESSES:
            raise LesionsegError(f"--shard {text[:40]}: expected K/N with 1 <= K <= N <= {MAX_PROCESSES:,}, e.g. 2/8")
        return cls(int(match[1]) - 1, int(match[2]))

    def takes(self, stem: str) -> bool:
        return share_of(stem, self.count) == self.index

    @property
    def journal(self) -> str:
        return (
            ".lesionseg-predict.jsonl"
            if self.count == 1
            else f".lesionseg-predict.{self.index + 1}-of-{self.count}.jsonl"
        )

    @property
    def lock(self) -> str:
        return self.journal.removesuffix(".jsonl") + ".lock"


def shard_count_of(journal: str) -> int:
    """N of a journal named .lesionseg-predict.K-of-N.jsonl (1 for the unsharded journal)."""
    match = re.search(r"-of-([0-9]+)\.jsonl$", journal)
    return int(match[1]) if match else 1


def read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], set[str], bool]:
    """Header, rows, the files it was about to write, and whether it finished; a last line cut short by a kill
    is ignored."""
    header, rows, intended, done = {}, [], set(), False
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if "header" in entry:
            header = entry["header"]
        elif entry.get("done"):
            done = True
        elif isinstance(entry.get("writing"), list):
            intended.update(map(str, entry["writing"]))
        elif "mask" in entry:
            rows.append(entry)
    return header, rows, intended, done


def read_table(out: Path) -> list[dict[str, Any]]:
    """The joined rows of an earlier run; a table predict cannot have written means the folder is someone else's."""
    path = out / RECORD
    if not path.exists():
        if (out / TABLE).exists():
            raise LesionsegError(f"{shown(out / TABLE)} exists without {RECORD}: not written by lesionseg predict")
        return []
    try:
        text = path.read_text()
    except OSError as exc:  # another user's file without read permission is not a foreign file
        raise LesionsegError(f"{shown(path)}: cannot read ({exc.strerror or exc})") from None
    try:
        rows = json.loads(text)
        assert isinstance(rows, list) and all(isinstance(r, dict) and "mask" in r for r in rows)
    except (ValueError, AssertionError):
        raise LesionsegError(
            f"{shown(path)}: not a record written by lesionseg predict; choose another --out"
        ) from None
    return rows


def input_identity(path: Path) -> dict[str, Any]:
    """What tells an input file from a changed one without reading it: its path, size and modification time."""
    info = path.stat()
    return {"file": shown(path), "file_bytes": info.st_size, "file_mtime_ns": info.st_mtime_ns}


def model_of(row: dict[str, Any]) -> tuple:
    return tuple(row.get(key) for key in MODEL_KEYS)


@dataclass
class Written:
    """Everything earlier runs into one folder wrote: rows by mask name, and the header each journal has."""

    rows: dict[str, dict[str, Any]]
    headers: dict[str, dict[str, Any]]
    finished: set[str]
    intended: dict[str, set[str]]  # per journal, files a run was about to write when it stopped: its own

    @classmethod
    def read(cls, out: Path) -> Written:
        rows = {row["mask"]: row for row in read_table(out)}
        headers, finished, intended = {}, set(), {}
        for path in sorted(out.glob(JOURNALS)):
            header, journal_rows, about_to_write, done = read_journal(path)
            headers[path.name] = header
            rows.update({row["mask"]: row for row in journal_rows})
            intended[path.name] = about_to_write
            if done:
                finished.add(path.name)
        return cls(rows, headers, finished, intended)

    def files(self) -> set[str]:
        named = {name for row in self.rows.values() for name in row_files(row)}
        return named.union(*self.intended.values())

    def complete(self, out: Path, mask: str, identity: dict[str, Any], extras: Extras, stem: str) -> bool:
        """This image's outputs are all there, as asked, from this very file, unchanged since."""
        row = self.rows.get(mask)
        if row is None or any(row.get(k) != v for k, v in identity.items()) or not (out / mask).is_file():
            return False
        return all(
            (row.get(key) == name and (out / name).is_file()) or row.get(f"{key}_skipped")
            for key, name in extras.names(stem).items()
        )


def row_files(row: dict[str, Any]) -> list[str]:
    return [row[key] for key in ("mask", "overlay", "probability_map") if isinstance(row.get(key), str) and row[key]]


def refuse_foreign(out: Path, planned: list[str], written: Written) -> None:
    """Refuse, before anything is written, to replace a file that no earlier predict into `out` wrote."""
    ours = written.files()
    for name in planned:
        if name not in ours and (out / name).exists():
            raise LesionsegError(
                f"{shown(out / name)}: exists and was not written by lesionseg predict; "
                "nothing was written: choose another --out"
            )


def refuse_replacing(mine: list[tuple[Path, str]], written: Written) -> None:
    """An input whose mask name an earlier run wrote from another file would silently replace that image's
    results (cameras restart their numbering): refused, both files named."""
    for path, stem in mine:
        row = written.rows.get(f"{MASKS}/{stem}.png")
        if row is not None and row.get("file") != shown(path):
            raise LesionsegError(
                f"{shown(path)} would replace {MASKS}/{stem}.png, which an earlier run wrote from {row.get('file')}; "
                "nothing was written: rename one, use another --out, or --overwrite to replace it"
            )


def refuse_other_model(written: Written, header: dict[str, Any]) -> None:
    """Resuming is only sound with the same model and options: masks of two models in one folder would be
    mistaken for one run's."""
    for name, earlier in written.headers.items():
        if earlier and earlier != header:
            differ = ", ".join(f"{k} {str(earlier.get(k))[:80]!r}" for k in header if earlier.get(k) != header[k])
            raise LesionsegError(
                f"{name}: this folder holds masks of another model or options ({differ}); "
                "use --overwrite to replace them, or another --out"
            )


def forget_other_models(out: Path, written: Written, header: dict[str, Any], own_lock: str) -> None:
    """--overwrite: what another model or other options wrote goes, its files, rows and journal with it, so the
    folder holds one model's results; refused while a run of that other model is still writing (the lock this run
    holds itself, on its own shard's journal, is not another run's)."""
    others = [name for name, earlier in written.headers.items() if earlier != header]
    for name in others:
        lock = name.removesuffix(".jsonl") + ".lock"
        if lock != own_lock and held_by_another(out / lock):
            raise LesionsegError(f"{name}: a run of another model is still writing into {shown(out)}; wait for it")
    current = (header["model"], header["version"], header["sha256"])
    stale = [row for row in written.rows.values() if model_of(row) != current]
    doomed = {f for row in stale for f in row_files(row)}.union(*(written.intended[name] for name in others))
    for name in sorted(doomed):
        (out / name).unlink(missing_ok=True)
    for name in others:
        (out / name).unlink(missing_ok=True)
    for row in stale:
        written.rows.pop(row["mask"], None)
    if stale:
        write_tables(out, sorted(written.rows.values(), key=lambda row: row["mask"]))


def remove_debris(out: Path, shard: Shard) -> None:
    """Temp files a killed run of this shard left (`write_atomically`'s .<name>.<random>.tmp): the folder is
    locked, so no live writer of this shard owns them, and other shards' names are left alone."""
    for folder in (MASKS, OVERLAYS, PROBABILITIES):
        for stale in (out / folder).glob(".*.tmp"):
            stem = stale.name[1:].rsplit(".", 2)[0].rsplit(".", 1)[0]
            if shard.takes(stem):
                stale.unlink(missing_ok=True)
    for stale in [*out.glob(f".{RECORD}.*.tmp"), *out.glob(f".{TABLE}.*.tmp"), *out.glob(f".{shard.journal}.*.tmp")]:
        stale.unlink(missing_ok=True)


class Journal:
    """This process's journal (its shard's lock held), rewritten at the start (header and the rows kept) and
    appended to per image."""

    def __init__(self, out: Path, shard: Shard, header: dict[str, Any], kept: list[dict[str, Any]]) -> None:
        self.path = out / shard.journal
        text = "".join(json.dumps(entry, allow_nan=False) + "\n" for entry in [{"header": header}, *kept])
        write_atomically(self.path, lambda handle: handle.write(text.encode()), "journal")
        self.handle = open(self.path, "a")

    def intend(self, names: list[str]) -> None:
        """Said before the files are written, so that a kill between the two leaves them recognisably ours."""
        self.handle.write(json.dumps({"writing": names}) + "\n")
        self.handle.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.handle.write(json.dumps(row, allow_nan=False) + "\n")
        self.handle.flush()

    def finish(self) -> None:
        self.handle.write(json.dumps({"done": True}) + "\n")
        self.handle.close()


def refuse_mixed_models(rows: list[dict[str, Any]], out: Path) -> None:
    models = {model_of(row) for row in rows}
    if len(models) > 1:
        shown_models = "; ".join(f"{m[0]} ({str(m[2])[:12]})" for m in sorted(models, key=str)[:3])
        raise LesionsegError(
            f"{shown(out)}: rows of {len(models)} models ({shown_models}); one table holds one model's results: "
            "rerun the odd shards with the same model, or predict with --overwrite"
        )


def write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    write_table(out / TABLE, rows)


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as strict JSON (path.json, written first: the record) and as CSV (path), each atomically."""
    text = json.dumps(rows, indent=1, allow_nan=False)
    write_atomically(path.with_suffix(".json"), lambda handle: handle.write(text.encode()), path.stem + ".json")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, lambda handle: handle.write(table.getvalue().encode()), path.name)


def merge(out: str | os.PathLike, count: int | None = None) -> list[dict[str, Any]] | None:
    """predictions.json and .csv from every journal in `out`, sorted by mask name (the same, however many
    processes wrote them). With `count`, only once all `count` shards have finished (None: not yet). A folder
    predict never wrote into, or rows of two models, are refused and nothing is written."""
    out = Path(out)
    if not any(out.glob(JOURNALS)) and not (out / RECORD).exists():  # checked before a lock file is made there
        raise LesionsegError(f"{shown(out)}: no journal or table of lesionseg predict here; nothing to merge")
    with locked(out / FOLDER_LOCK, "the folder's table", wait=True):
        written = Written.read(out)
        if count is not None:
            done = sum(1 for name in written.finished if shard_count_of(name) == count)
            if done < count:
                return None
        rows = [row for mask, row in sorted(written.rows.items()) if (out / mask).is_file()]
        refuse_mixed_models(rows, out)
        write_tables(out, rows)
    return rows
