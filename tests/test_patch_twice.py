"""A model already abliterated along the direction (a finished in-place folder without its record, or one
abliterated elsewhere) is refused in one line before anything is written; ``--force`` converts anyway."""

from __future__ import annotations

import shutil
from pathlib import Path

from orthopatch.io.formats import INPLACE_JOURNAL_DIR as JOURNAL_DIR
from orthopatch.io.formats import RECORD_NAME
from orthopatch.patch.apply import ApplyOptions, apply
from tests.helpers import Converted, cli, one_error_line, untouched

MATCH = "already abliterated along this direction?"


def test_an_output_given_as_a_model_is_refused_unless_forced(converted: Converted, tmp_path: Path) -> None:
    model = tmp_path / "abliterated-elsewhere"
    shutil.copytree(converted.out, model)
    (model / RECORD_NAME).unlink()  # no record: only the tensors tell
    out = tmp_path / "out"
    with untouched(model):
        line = one_error_line(cli("apply", model, converted.direction, "-o", out, "-q"))
    assert MATCH in line and "--force" in line, line
    assert not out.exists()
    result = cli("apply", model, converted.direction, "-o", out, "-q", "--force")
    assert result.exit_code == 0, result.output


def test_a_folder_finished_in_place_without_its_record_is_refused_unless_forced(converted: Converted,
                                                                                 tmp_path: Path) -> None:
    work = tmp_path / "model"
    shutil.copytree(converted.model, work)
    apply(ApplyOptions(model=work, direction=converted.direction, in_place=True, quiet=True))
    (work / RECORD_NAME).unlink()
    with untouched(work):
        line = one_error_line(cli("apply", work, converted.direction, "--in-place", "-q"))
    assert MATCH in line, line
    assert not (work / JOURNAL_DIR).exists()
    result = cli("apply", work, converted.direction, "--in-place", "-q", "--force")
    assert result.exit_code == 0, result.output


def test_another_direction_is_not_refused(converted: Converted, tmp_path: Path) -> None:
    from tests.helpers import TINY, save_direction

    other = tmp_path / "other.pth"
    save_direction(other, TINY.hidden, seed=7)
    model = tmp_path / "abliterated"
    shutil.copytree(converted.out, model)
    (model / RECORD_NAME).unlink()
    result = cli("apply", model, other, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
