"""A small file of the model folder that links outside it (``notes.txt -> ~/secret``) is neither copied
into the output nor uploaded; links inside the folder, or into a cache snapshot's own blobs, are."""

from __future__ import annotations

import shutil
from pathlib import Path

from orthopatch.hub import upload_patterns
from orthopatch.io.model_files import model_files
from orthopatch.patch.apply import ApplyOptions, apply
from tests.helpers import Converted


def test_a_link_outside_the_model_is_skipped_with_a_note(converted: Converted, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(converted.model, model)
    secret = tmp_path / "home" / "secret"
    secret.parent.mkdir()
    secret.write_text("a user's secret")
    (model / "notes.txt").symlink_to(secret)
    (model / "inside.txt").symlink_to(model / "tokenizer.json")
    notes: list[str] = []
    apply(ApplyOptions(model=model, direction=converted.direction, out=tmp_path / "out", quiet=True),
          log=notes.append)
    assert not (tmp_path / "out" / "notes.txt").exists()
    assert (tmp_path / "out" / "inside.txt").read_text() == (model / "tokenizer.json").read_text()
    assert any("notes.txt" in n and "outside the model folder" in n for n in notes), notes
    (tmp_path / "out" / "notes.txt").symlink_to(secret)  # the same rule for what a push uploads
    assert "notes.txt" not in upload_patterns(tmp_path / "out", [])


def test_a_cache_snapshot_links_into_its_own_blobs(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    (snapshot / "config.json").symlink_to(repo / "blobs" / "abc")
    other = tmp_path / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "def").write_text("x")
    (snapshot / "stolen.txt").symlink_to(other / "def")
    files = model_files(snapshot)
    assert files.copied == [Path("config.json")]
    assert [rel for rel, _ in files.skipped] == [Path("stolen.txt")]
