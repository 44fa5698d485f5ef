"""predict's output folder: what it writes, what it has written, and how shards join.

    OUT/masks/<stem>.png            0/255 at the image's own size (what the ISIC scorer reads)
    OUT/overlays/<stem>.png|.jpg    with --overlays [png|jpg]: the outline on the image
    OUT/probabilities/<stem>.png    with --probabilities: the lesion probability, 0..255 at the image's own size
    OUT/predictions.json, .csv      one row per image, sorted by mask name, joined from every shard
    OUT/.lesionseg-predict[.K-of-N].jsonl
                                    each process's journal: a header (model and options), then one row per image
                                    appended as soon as its files are written, then a "done" line

The journals make a run resumable (an image whose row and files exist is not redone), let shards write side
by side without sharing a file, and are the record of what predict wrote: a file it would write that no
journal or table names is someone else's, and the run is refused before anything is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionseg.errors import LesionsegError
from lesionseg.files import shown, write_atomically

MASKS, OVERLAYS, PROBABILITIES = "masks", "overlays", "probabilities"
OVERLAY_FORMATS = ("png", "jpg")
RECORD, TABLE = "predictions.json", "predictions.csv"
JOURNALS = ".lesionseg-predict*.jsonl"


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

    def names(self, stem: str) -> dict[str, str]:
        """This image's extra files, by the row key that names each."""
        names = {}
        if self.overlays:
            names["overlay"] = f"{OVERLAYS}/{stem}.{self.overlays}"
        if self.probabilities:
            names["probability_map"] = f"{PROBABILITIES}/{stem}.png"
        return names

    def folders(self) -> list[str]:
        return [MASKS, *([OVERLAYS] if self.overlays else []), *([PROBABILITIES] if self.probabilities else [])]


@dataclass(frozen=True)
class Shard:
    """This process's share of the inputs: index 0..count-1 (the command line says K/N with K from 1)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """`K/N` from --shard; else torchrun's RANK / WORLD_SIZE; else the whole input."""
        if text is None:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
        k, _, n = text.partition("/")
        if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            raise LesionsegError(f"--shard {text}: expected K/N with 1 <= K <= N, e.g. 2/8")
        return cls(int(k) - 1, int(n))

    def takes(self, stem: str) -> bool:
        return share_of(stem, self.count) == self.index

    @property
    def journal(self) -> str:
        return (
            ".lesionseg-predict.jsonl"
            if self.count == 1
            else f".lesionseg-predict.{self.index + 1}-of-{self.count}.jsonl"
        )


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
        rows = json.loads(path.read_text())
        assert isinstance(rows, list) and all(isinstance(r, dict) and "mask" in r for r in rows)
    except (OSError, ValueError, AssertionError):
        raise LesionsegError(
            f"{shown(path)}: not a record written by lesionseg predict; choose another --out"
        ) from None
    return rows


@dataclass
class Written:
    """Everything earlier runs into one folder wrote: rows by mask name, and the header each journal has."""

    rows: dict[str, dict[str, Any]]
    headers: dict[str, dict[str, Any]]
    finished: set[str]
    intended: set[str]  # files a run was about to write when it stopped: its own, though no row names them

    @classmethod
    def read(cls, out: Path) -> Written:
        rows = {row["mask"]: row for row in read_table(out)}
        headers, finished, intended = {}, set(), set()
        for path in sorted(out.glob(JOURNALS)):
            header, journal_rows, about_to_write, done = read_journal(path)
            headers[path.name] = header
            rows.update({row["mask"]: row for row in journal_rows})
            intended |= about_to_write
            if done:
                finished.add(path.name)
        return cls(rows, headers, finished, intended)

    def files(self) -> set[str]:
        keys = ("mask", "overlay", "probability_map")
        named = {row[key] for row in self.rows.values() for key in keys if row.get(key)}
        return named | self.intended

    def complete(self, out: Path, mask: str, source: str, extras: Extras, stem: str) -> bool:
        """This image's outputs are all there, as asked, from this very source file."""
        row = self.rows.get(mask)
        if row is None or row.get("file") != source or not (out / mask).is_file():
            return False
        return all(row.get(key) == name and (out / name).is_file() for key, name in extras.names(stem).items())


def refuse_foreign(out: Path, planned: list[str], written: Written) -> None:
    """Refuse, before anything is written, to replace a file that no earlier predict into `out` wrote."""
    ours = written.files()
    for name in planned:
        if name not in ours and (out / name).exists():
            raise LesionsegError(
                f"{shown(out / name)}: exists and was not written by lesionseg predict; "
                "nothing was written: choose another --out"
            )


def refuse_other_model(written: Written, header: dict[str, Any]) -> None:
    """Resuming is only sound with the same model and options: masks of two models in one folder would be
    mistaken for one run's."""
    for name, earlier in written.headers.items():
        if earlier and earlier != header:
            differ = ", ".join(f"{k} {earlier.get(k)!r}" for k in header if earlier.get(k) != header[k])
            raise LesionsegError(
                f"{name}: this folder holds masks of another model or options ({differ}); "
                "use --overwrite to redo them, or another --out"
            )


def forget_other_models(out: Path, written: Written, header: dict[str, Any]) -> None:
    """--overwrite: journals of another model or options go (their masks are all being redone)."""
    for name, earlier in written.headers.items():
        if earlier != header:
            (out / name).unlink(missing_ok=True)


class Journal:
    """This process's journal, rewritten at the start (header and the rows kept) and appended to per image."""

    def __init__(self, out: Path, shard: Shard, header: dict[str, Any], kept: list[dict[str, Any]]) -> None:
        self.path = out / shard.journal
        text = "".join(json.dumps(entry) + "\n" for entry in [{"header": header}, *kept])
        write_atomically(self.path, lambda handle: handle.write(text.encode()), "journal")
        self.handle = open(self.path, "a")

    def intend(self, names: list[str]) -> None:
        """Said before the files are written, so that a kill between the two leaves them recognisably ours."""
        self.handle.write(json.dumps({"writing": names}) + "\n")
        self.handle.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def finish(self) -> None:
        self.handle.write(json.dumps({"done": True}) + "\n")
        self.handle.close()


def merge(out: str | os.PathLike, count: int | None = None) -> list[dict[str, Any]] | None:
    """predictions.json and .csv from every journal in `out`, sorted by mask name (the same, however many
    processes wrote them). With `count`, only once all `count` shards have finished (None: not yet)."""
    out = Path(out)
    written = Written.read(out)
    if count is not None:
        names = [Shard(k, count).journal for k in range(count)]
        if not all(name in written.finished for name in names):
            return None
    rows = [row for mask, row in sorted(written.rows.items()) if (out / mask).is_file()]
    write_atomically(out / RECORD, lambda handle: handle.write(json.dumps(rows, indent=1).encode()), RECORD)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(out / TABLE, lambda handle: handle.write(text.getvalue().encode()), TABLE)
    return rows
