"""The in-place journal is untrusted input: its files are never followed out of the model folder.

A journal left by a crash may have been tampered with: its data file, its temporary state name or its
copy of the model card replaced by a link to a user's file, or a FIFO put where the data file goes.
A resume must neither overwrite a file outside the model, copy one into the model's card, nor hang.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from orthopatch.io.formats import INPLACE_JOURNAL_DIR as JOURNAL_DIR
from orthopatch.io.formats import INPLACE_STATE_NAME as STATE_NAME
from tests import test_inplace
from tests.helpers import folder_hashes, one_error_line, run_orthopatch
from tests.test_inplace import converted_files, fly, fresh_copy, start_journal

tiny = test_inplace.tiny  # the module's fixture: a small model with a card, its direction, the reference

SECRET = "the user's secret, never to be copied or overwritten\n"


def users_file(tmp_path: Path) -> Path:
    outside = tmp_path / "home" / "secret.txt"
    outside.parent.mkdir()
    outside.write_text(SECRET)
    return outside


def test_a_journal_data_file_linked_outside_is_replaced_not_written_through(tiny, tmp_path) -> None:
    """Nothing in flight: the data file is the run's to recreate; the link is replaced, the user's file kept."""
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    outside = users_file(tmp_path)
    _, _, options = start_journal(work, direction, 2, tiny)
    (work / JOURNAL_DIR / "journal").symlink_to(outside)
    result = run_orthopatch("apply", work, direction, "--in-place", "-q")
    assert result.returncode == 0, result.stderr
    assert outside.read_text() == SECRET
    assert converted_files(work) == reference


def test_a_temporary_state_name_linked_outside_is_not_written_through(tiny, tmp_path) -> None:
    model, direction, reference = tiny
    work = fresh_copy(model, tmp_path / "model")
    outside = users_file(tmp_path)
    start_journal(work, direction, 2, tiny)
    (work / JOURNAL_DIR / f".{STATE_NAME}.orthopatch-tmp").symlink_to(outside)
    result = run_orthopatch("apply", work, direction, "--in-place", "-q")
    assert result.returncode == 0, result.stderr
    assert outside.read_text() == SECRET
    assert converted_files(work) == reference


def test_a_journal_card_linked_to_a_secret_is_refused_not_copied_into_the_card(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    outside = users_file(tmp_path)
    start_journal(work, direction, 6, tiny)
    card = work / JOURNAL_DIR / "README.md"
    card.unlink()
    card.symlink_to(outside)
    line = one_error_line(run_orthopatch("apply", work, direction, "--in-place", "-q"))
    assert "symbolic link in the in-place journal" in line, line
    assert SECRET.strip() not in (work / "README.md").read_text()
    assert outside.read_text() == SECRET


def test_a_journal_data_file_that_is_a_fifo_in_flight_is_refused_without_hanging(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    journal, targets, _ = start_journal(work, direction, 2, tiny)
    fly(tiny, journal, targets[2], 2)
    journal.data_path.unlink()
    os.mkfifo(journal.data_path)
    before = folder_hashes(work)
    try:
        result = run_orthopatch("apply", work, direction, "--in-place", "-q", timeout=60)
    except subprocess.TimeoutExpired:  # pragma: no cover - the bug this test is for
        raise AssertionError("the resume hung on a FIFO in the journal") from None
    line = one_error_line(result)
    assert "FIFO" in line and "journal" in line, line
    assert folder_hashes(work) == before


def test_a_journal_state_linked_outside_is_refused(tiny, tmp_path) -> None:
    model, direction, _ = tiny
    work = fresh_copy(model, tmp_path / "model")
    start_journal(work, direction, 2, tiny)
    state = work / JOURNAL_DIR / STATE_NAME
    copy = tmp_path / "state-elsewhere.json"
    copy.write_bytes(state.read_bytes())
    state.unlink()
    state.symlink_to(copy)
    before = copy.read_bytes()
    line = one_error_line(run_orthopatch("apply", work, direction, "--in-place", "-q"))
    assert "symbolic link" in line, line
    assert copy.read_bytes() == before
