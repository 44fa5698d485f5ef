"""Every example a user would paste from the README and the guide: Python blocks run as they are (on a sample
image, with the released model); every `lesionseg` command in a shell block is parsed by the real parser, so a
documented subcommand, flag or choice cannot disappear silently."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from lesionseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SAMPLE = ROOT / "src" / "lesionseg" / "sample"
# The README's placeholders, each replaced by a value of its kind before parsing.
PLACEHOLDERS = {"N": "2", "X": "0.1", "MM": "0.02", "K": "1", "$SLURM_ARRAY_TASK_ID": "1"}


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def python_examples() -> list[tuple[str, str]]:
    return [(f"{path.name}:{n}", code) for path in DOCS for n, code in enumerate(blocks(path, "python"))]


def commands_in(path: Path) -> list[str]:
    """Each `lesionseg SUBCOMMAND ...` of the shell blocks, continuation lines joined, comments dropped."""
    found = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line)
            match = re.search(r"(^|[\s'/])lesionseg (\w.*)$", line)
            if match and not line.lstrip().startswith(("pip", "make")):
                rest = match.group(2)
                found.append((rest.split("'")[0] if match.group(1) == "'" else rest).strip())
    return found


def as_arguments(command: str) -> list[str]:
    """Optional parts kept (their first alternative), placeholders given values."""
    command = re.sub(r"\[([^\]|]*?)(?:\|[^\]]*)?\]", r"\1", command)
    return [PLACEHOLDERS.get(word, word) for word in shlex.split(command)]


def documented_commands() -> list[tuple[str, str]]:
    return [(f"{path.name}: lesionseg {c}", c) for path in DOCS for c in commands_in(path)]


def test_the_docs_have_examples():
    assert len(python_examples()) >= 1 and len(documented_commands()) >= 20


@pytest.mark.parametrize("name, command", documented_commands(), ids=[n for n, _ in documented_commands()])
def test_every_documented_command_parses(name, command):
    args = build_parser().parse_args(as_arguments(command))
    assert callable(args.func), name


@pytest.mark.parametrize("name, code", python_examples(), ids=[n for n, _ in python_examples()])
def test_every_python_example_runs(name, code, tmp_path, monkeypatch):
    """Run where a user would: beside an image called lesion.jpg, with the released model."""
    shutil.copy(next(SAMPLE.rglob("*.jpg")), tmp_path / "lesion.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, name, "exec"), {"__name__": "__main__"})
