"""Weighted direction files: per-layer, per-component strengths through apply, the record, the card and verify."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from orthopatch.io.formats import CARD_NAME, RECORD_NAME
from orthopatch.patch.apply import ApplyOptions, apply
from orthopatch.patch.direction import load_direction, save_weighted_direction
from orthopatch.patch.record import ConversionRecord, Method
from orthopatch.patch.weights import ComponentWeights
from orthopatch.verify import VerifyOptions, verify
from tests.helpers import TINIEST, cli, one_error_line, tiny_llama

WEIGHTS = ComponentWeights(attention=(0.5, 0.0), mlp=(1.25, 0.75), embedding=0.75)


def _all_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighted")
    model = tiny_llama(root / "model", shape=TINIEST)
    rows = torch.randn(TINIEST.layers + 1, TINIEST.hidden, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True)
    plain = root / "plain.pth"
    torch.save(rows.float(), plain)
    path = root / "weighted.safetensors"
    save_weighted_direction(path, rows.float().numpy(), WEIGHTS, {"made_by": "test"})
    apply(ApplyOptions(model=model, direction=path, out=root / "out", quiet=True, method=Method(scale=0.8)))
    return model, plain, path, root / "out", root


def test_a_plain_file_has_no_weights_and_a_weighted_one_reads_back(weighted):
    _, plain, path, _, _ = weighted
    assert load_direction(plain, TINIEST.hidden, TINIEST.layers).weights is None
    loaded = load_direction(path, TINIEST.hidden, TINIEST.layers)
    assert loaded.weights == WEIGHTS and loaded.rows.shape == (TINIEST.layers + 1, TINIEST.hidden)


def test_weighted_apply_equals_apply_with_each_targets_scale(weighted):
    """Every target's bytes equal those of a plain apply at scale × its weight; weight 0 leaves it as the source."""
    model, plain, _, out, root = weighted
    source, result = _all_tensors(model), _all_tensors(out)
    record = ConversionRecord.read(out / RECORD_NAME)
    strengths = {t.name: 0.8 * WEIGHTS.for_target(t.role, t.layer) for t in record.tensors_patched}
    assert "model.layers.1.self_attn.o_proj.weight" not in strengths  # weight 0: not planned
    assert torch.equal(result["model.layers.1.self_attn.o_proj.weight"],
                       source["model.layers.1.self_attn.o_proj.weight"])
    for scale in sorted(set(strengths.values())):
        ref = root / f"plain-{scale}"
        apply(ApplyOptions(model=model, direction=plain, out=ref, quiet=True, method=Method(scale=scale)))
        by_scale = _all_tensors(ref)
        for name, s in strengths.items():
            if s == scale:
                assert torch.equal(result[name], by_scale[name]), name
    for name in set(source) - set(strengths):
        assert torch.equal(result[name], source[name]), name


def test_the_record_and_the_card_show_the_weights_and_verify_passes(weighted):
    model, _, path, out, _ = weighted
    doc = json.loads((out / RECORD_NAME).read_text())
    assert doc["options"]["weights"] == WEIGHTS.to_json()
    assert doc["fingerprint"]["method"]["weights"] == WEIGHTS.to_json()
    assert ConversionRecord.read(out / RECORD_NAME).method.weights == WEIGHTS
    assert "| weights | attention [0.5 0], mlp [1.25 0.75], embedding 0.75 |" in (out / CARD_NAME).read_text()
    report = verify(VerifyOptions(out=out, direction=path, source=model, quiet=True))
    assert report.ok, report.failures
    assert len(report.checks) == 4  # embedding, attention 0, mlp 0 and 1
    assert cli("verify", out, "--direction", path, "--source", model).exit_code == 0


def test_verify_fails_when_the_weights_were_not_those_applied(weighted, tmp_path):
    model, _, _, out, _ = weighted
    other = tmp_path / "other.safetensors"
    rows = load_direction(weighted[2], TINIEST.hidden, TINIEST.layers).rows
    save_weighted_direction(other, rows, ComponentWeights((1.0, 1.0), (1.0, 1.0), 1.0), {})
    report = verify(VerifyOptions(out=out, direction=other, source=model, quiet=True))
    assert not report.ok


def test_bad_weighted_files_are_one_line(weighted, tmp_path):
    model = weighted[0]
    rows = np.ones((TINIEST.layers + 1, TINIEST.hidden), dtype=np.float32)
    wrong_layers = tmp_path / "layers.safetensors"
    save_weighted_direction(wrong_layers, rows, ComponentWeights((1.0,) * 3, (1.0,) * 3, 1.0), {})
    zero = tmp_path / "zero.safetensors"
    save_weighted_direction(zero, rows, ComponentWeights((0.0, 0.0), (0.0, 0.0), 0.0), {})
    for path, words in ((wrong_layers, "weights for 3 layers"), (zero, "every weight of the direction is 0")):
        result = cli("apply", model, path, "-o", tmp_path / f"out-{path.stem}", "-q")
        assert result.exit_code != 0 and words in one_error_line(result)
    with pytest.raises(ValueError):
        ComponentWeights((1.0, -1.0), (1.0, 1.0))


def test_in_place_with_weights_writes_the_same_bytes(weighted, tmp_path):
    import shutil

    model, _, path, out, _ = weighted
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    apply(ApplyOptions(model=copy, direction=path, quiet=True, in_place=True, method=Method(scale=0.8)))
    assert _all_tensors(copy).keys() == _all_tensors(out).keys()
    for name, value in _all_tensors(out).items():
        assert torch.equal(_all_tensors(copy)[name], value), name
