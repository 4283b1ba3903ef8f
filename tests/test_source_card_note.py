"""A source card whose front matter cannot be read still converts, with a one-line note saying that its
metadata (licence, tags) was not carried over, rather than silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orthopatch.patch.apply import ApplyOptions, apply
from tests.helpers import Converted, run_orthopatch

FRONT_MATTERS = {
    "tags: 5": "field 'tags' is not a string or a list of strings",
    "license: [mit, {a: b}]": "field 'license' is not a string or a list of strings",
    "- just\n- a list": "not a mapping",
    "tags: " + "[" * 100_000 + "]" * 100_000: "nests deeper than",
    "license: mit\n  bad: : indent": "not valid YAML",
}


@pytest.mark.parametrize("front, why", list(FRONT_MATTERS.items()))
def test_unreadable_front_matter_is_noted_in_one_line(converted: Converted, tmp_path: Path, front, why) -> None:
    model = tmp_path / "model"
    shutil.copytree(converted.model, model)
    (model / "README.md").write_text(f"---\n{front}\n---\n# The body\n")
    notes: list[str] = []
    apply(ApplyOptions(model=model, direction=converted.direction, out=tmp_path / "out", quiet=True), log=notes.append)
    cards = [n for n in notes if "source card" in n]
    assert len(cards) == 1 and cards[0].startswith("note: ") and "\n" not in cards[0], notes
    assert "metadata (license, tags) could not be read and was not carried over" in cards[0] and why in cards[0]
    assert "# The body" in (tmp_path / "out" / "README.md").read_text()


def test_readable_front_matter_gives_no_note(converted: Converted, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(converted.model, model)
    (model / "README.md").write_text("---\nlicense: mit\ntags: [a, b]\n---\n# The body\n")
    notes: list[str] = []
    apply(ApplyOptions(model=model, direction=converted.direction, out=tmp_path / "out", quiet=True), log=notes.append)
    assert not [n for n in notes if "source card" in n], notes


def test_the_cli_prints_the_note_on_stderr(converted: Converted, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(converted.model, model)
    (model / "README.md").write_text("---\ntags: 5\n---\n# The body\n")
    result = run_orthopatch("apply", model, converted.direction, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "source card" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "README.md" in notes[0], result.stderr
