"""The record a run leaves: one type, written by apply and read back strictly; the fingerprint."""

from __future__ import annotations

import json
import re

import pytest

from orthopatch.errors import OrthopatchError
from orthopatch.io.checkpoint import open_checkpoint
from orthopatch.io.formats import CONVERSION_RECORD_FORMAT as RECORD_FORMAT
from orthopatch.io.formats import PARTIAL_NAME, RECORD_NAME
from orthopatch.patch.apply import ApplyOptions, apply
from orthopatch.patch.output import OutputFolder, OutputState
from orthopatch.patch.plan import Selection
from orthopatch.patch.record import ConversionRecord, Fingerprint, Method
from tests.helpers import TINY, save_direction, tiny_llama


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    model = tiny_llama(root / "model")
    direction = root / "r.pth"
    save_direction(direction, TINY.hidden)
    method = Method(Selection(frozenset({0, 2}), embeddings=False), scale=0.5, norm_preserving=True)
    apply(ApplyOptions(model=model, direction=direction, out=root / "out", quiet=True, method=method))
    return model, direction, root / "out", method


def test_the_written_record_reads_back_as_written(converted) -> None:
    _, _, out, method = converted
    doc = json.loads((out / RECORD_NAME).read_text())
    record = ConversionRecord.read(out / RECORD_NAME)
    assert record.to_json() == doc
    assert record.format == RECORD_FORMAT == doc["format"]
    assert record.method == method
    assert [t.layer for t in record.tensors_patched] == [0, 0, 2, 2]
    assert doc["fingerprint"]["device"] == "cpu" and doc["fingerprint"]["method"] == method.to_json()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(format=99), "unknown record format 99"),
    (lambda r: r["options"].update(scale="half"), "cannot read the options it records (scale 'half')"),
    (lambda r: r["options"].update(layers=[-1]), "cannot read the options it records (layers [-1])"),
    (lambda r: r["direction"].pop("sha256"), "cannot read the direction it records"),
    (lambda r: r["tensors_patched"].append({"name": 3}), "cannot read a patched tensor it records"),
    (lambda r: r.update(total_bytes="many"), "cannot read the byte counts it records"),
], ids=["format", "scale", "layers", "direction", "tensor", "bytes"])
def test_a_malformed_record_is_one_error_naming_the_file(converted, tmp_path, edit, message) -> None:
    _, _, out, _ = converted
    doc = json.loads((out / RECORD_NAME).read_text())
    edit(doc)
    path = tmp_path / RECORD_NAME
    path.write_text(json.dumps(doc))
    with pytest.raises(OrthopatchError, match=re.escape(message)) as caught:
        ConversionRecord.read(path)
    assert caught.value.path == str(path)


def test_a_format_1_record_is_still_read(converted) -> None:
    _, _, out, method = converted
    doc = json.loads((out / RECORD_NAME).read_text()) | {"format": 1}
    assert ConversionRecord.from_json(doc).method == method


def test_a_run_resumed_on_another_device_does_not_reuse_shards(converted) -> None:
    model, direction, out, method = converted
    from orthopatch.patch.apply import prepare
    from orthopatch.patch.kernel import BLOCK_ELEMENTS

    plan, loaded = prepare(ApplyOptions(model=model, direction=direction, method=method))
    cpu = Fingerprint.of(plan, loaded.sha256, method, "cpu", BLOCK_ELEMENTS)
    assert cpu.to_json() == json.loads((out / RECORD_NAME).read_text())["fingerprint"]
    cuda = Fingerprint.of(plan, loaded.sha256, method, "cuda", 1 << 25)
    assert cuda.to_json() != cpu.to_json()
    with OutputFolder(out, open_checkpoint(model).root) as folder:
        assert folder.state(cpu.to_json()) is OutputState.COMPLETE
        (out / PARTIAL_NAME).write_text(json.dumps(cpu.to_json()))  # an interrupted CPU run
        try:
            assert folder.state(cpu.to_json()) is OutputState.PARTIAL
            assert folder.state(cuda.to_json()) is OutputState.OTHER
        finally:
            (out / PARTIAL_NAME).unlink()
