"""`orthopatch verify`: a correct output passes, every kind of damage fails naming its tensor."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import PARTIAL_NAME, RECORD_NAME
from orthopatch.io.safetensors_header import read_header
from orthopatch.patch.apply import ApplyOptions, apply
from orthopatch.patch.plan import Selection
from orthopatch.patch.record import Method
from orthopatch.verify import RoundingTally, VerifyOptions, format_table, ulp, verify
from tests.helpers import (
    DTYPES_BY_NAME,
    INT_VIEWS,
    TINY,
    Converted,
    cli,
    one_error_line,
    reference,
    save_direction,
    tiny_llama,
    untouched,
    write_sharded,
)


@pytest.fixture(scope="module")
def made(converted: Converted) -> tuple[Path, Path, Path]:
    """A tiny Llama, its direction and its converted copy (never modified: tests copy it first)."""
    return converted.model, converted.direction, converted.out


@pytest.fixture
def out_copy(made, tmp_path) -> Path:
    shutil.copytree(made[2], tmp_path / "out")
    return tmp_path / "out"


def run_verify(out: Path, direction: Path, source: Path | None = None, *extra: str):
    args = ["verify", out, "--direction", direction, "-q", *extra]
    if source is not None:
        args += ["--source", source]
    return cli(*args)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("orthopatch: error: ")]


def load(path: Path, name: str) -> torch.Tensor:
    entry = read_header(path).entry(name)
    with open(path, "rb") as f:
        f.seek(entry.begin)
        raw = bytearray(f.read(entry.nbytes))
    return torch.frombuffer(raw, dtype=DTYPES_BY_NAME[entry.dtype]).reshape(entry.shape).clone()


def store(path: Path, name: str, tensor: torch.Tensor) -> None:
    entry = read_header(path).entry(name)
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert len(data) == entry.nbytes
    with open(path, "r+b") as f:
        f.seek(entry.begin)
        f.write(data)


def shard_of(folder: Path, name: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


O_PROJ = "model.layers.1.self_attn.o_proj.weight"
DOWN = "model.layers.2.mlp.down_proj.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def test_a_correct_output_passes_with_and_without_source(made) -> None:
    model, direction, out = made
    with untouched(model, out):
        with_source = run_verify(out, direction, model)
        alone = run_verify(out, direction)
    assert with_source.exit_code == 0, with_source.output
    assert alone.exit_code == 0, alone.output
    table = with_source.stdout
    assert "attention (before -> after)" in table and "mlp (before -> after)" in table
    assert "embedding" in table and "verified" in table
    rows = [line.split() for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(TINY.layers))
    for row in rows:  # before -> after, for attention and mlp
        before, after = float(row[1]), float(row[3])
        assert before > 1e-2 and after < 1e-2 * before
    assert "(after)" in alone.stdout and "verified" in alone.stdout


def test_the_report_holds_before_and_after(made) -> None:
    model, direction, out = made
    report = verify(VerifyOptions(out=out, direction=direction, source=model, quiet=True))
    assert report.ok and report.identical > 0
    assert {c.role for c in report.checks} == {"embedding", "attention", "mlp"}
    assert len(report.checks) == 1 + 2 * TINY.layers
    # One row per layer (attention, then mlp) and one for the embedding, each cell "before -> after"
    # with the share ‖component along u‖ / ‖W‖ of that tensor's check.
    share = {(c.layer, c.role): tuple((part[0] / part[1]) ** 0.5 for part in (c.before, c.after))
             for c in report.checks}
    cells = {}
    for line in format_table(report).splitlines()[2:]:
        words = line.split()
        key = None if words[0] == "embedding" else int(words[0])
        roles = ["embedding"] if key is None else ["attention", "mlp"]
        for k, role in enumerate(roles):
            before, arrow, after = words[1 + 3 * k: 4 + 3 * k]
            assert arrow == "->"
            cells[key, role] = (float(before), float(after))
    assert cells.keys() == share.keys()
    for key, (before, after) in cells.items():
        assert before == pytest.approx(share[key][0], rel=6e-3) and after == pytest.approx(share[key][1], rel=6e-3)
        assert before > 1e-2 and after < 1e-2 * before, key


@pytest.mark.parametrize("chunk", [1, 7, 64 * 5 + 3])
def test_small_blocks_give_the_same_verdicts(made, out_copy, chunk: int) -> None:
    model, direction, out = made
    for source in (model, None):
        report = verify(VerifyOptions(out=out, direction=direction, source=source, quiet=True, chunk_elements=chunk))
        assert report.ok, [str(f) for f in report.failures]
    w = load(shard_of(out_copy, DOWN), DOWN)
    w[-1, -1] = w[-1, -1] * 2 + 1  # the very last element: found only if every block is read
    store(shard_of(out_copy, DOWN), DOWN, w)
    report = verify(VerifyOptions(out=out_copy, direction=direction, source=model, quiet=True, chunk_elements=chunk))
    assert [f.tensor for f in report.failures] == [DOWN]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("method", [
    {"selection": Selection(layers=frozenset({1}))},
    {"selection": Selection(embeddings=False)},
    {"scale": 0.5},
    {"norm_preserving": True},
    {"scale": 2.0, "norm_preserving": True},
], ids=["layer1", "no-embeddings", "half", "norm-preserving", "reflect-norm-preserving"])
def test_recorded_options_are_used(tmp_path, dtype, method) -> None:
    model = tiny_llama(tmp_path / "model", dtype=dtype)
    direction = tmp_path / "r.pth"
    save_direction(direction, TINY.hidden)
    apply(ApplyOptions(model=model, direction=direction, out=tmp_path / "out", quiet=True, method=Method(**method)))
    report = verify(VerifyOptions(out=tmp_path / "out", direction=direction, source=model, quiet=True))
    assert report.ok, [str(f) for f in report.failures]
    planned = 2 * TINY.layers + 1
    if "selection" in method:
        planned = 2 + 1 if method["selection"].layers else 2 * TINY.layers
    assert len(report.checks) == planned
    alone = verify(VerifyOptions(out=tmp_path / "out", direction=direction, quiet=True))
    assert alone.ok, [str(f) for f in alone.failures]
    if method.get("scale", 1.0) != 1.0:
        assert any("scale" in note for note in alone.notes)


def test_float64_biases_and_per_layer_directions(tmp_path) -> None:
    h, layers = 32, 2
    gen = torch.Generator().manual_seed(3)
    tensors = {"model.embed_tokens.weight": torch.randn(50, h, generator=gen, dtype=torch.float64)}
    tensors["model.embed_tokens.weight"][7] = 0  # an unused token: its row stays exactly zero
    for n in range(layers):
        p = f"model.layers.{n}"
        tensors |= {f"{p}.self_attn.o_proj.weight": torch.randn(h, h, generator=gen, dtype=torch.float64),
                    f"{p}.self_attn.o_proj.bias": torch.randn(h, generator=gen, dtype=torch.float64),
                    f"{p}.mlp.down_proj.weight": torch.randn(h, 3 * h, generator=gen, dtype=torch.float64)}
    config = {"model_type": "llama", "hidden_size": h, "num_hidden_layers": layers}
    model = write_sharded(tmp_path / "model", [tensors], config)
    direction = tmp_path / "r.pth"
    save_direction(direction, h, rows=layers + 1)
    apply(ApplyOptions(model=model, direction=direction, out=tmp_path / "out", quiet=True))
    for source in (model, None):
        report = verify(VerifyOptions(out=tmp_path / "out", direction=direction, source=source, quiet=True))
        assert report.ok, [str(f) for f in report.failures]
    assert len(report.checks) == 1 + 3 * layers


def test_norm_gains_weight_each_direction(tmp_path) -> None:
    """Gemma 2: the projection is against gain ⊙ r; verify rebuilds the same unit vectors."""
    h, layers = 32, 2
    gen = torch.Generator().manual_seed(4)
    bf = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16)  # noqa: E731
    tensors = {"model.embed_tokens.weight": bf(40, h), "model.norm.weight": bf(h)}
    for n in range(layers):
        p = f"model.layers.{n}"
        tensors |= {f"{p}.self_attn.o_proj.weight": bf(h, h), f"{p}.mlp.down_proj.weight": bf(h, 2 * h),
                    f"{p}.post_attention_layernorm.weight": bf(h), f"{p}.post_feedforward_layernorm.weight": bf(h)}
    config = {"model_type": "gemma2", "hidden_size": h, "num_hidden_layers": layers}
    model = write_sharded(tmp_path / "model", [tensors], config)
    direction = tmp_path / "r.pth"
    save_direction(direction, h)
    apply(ApplyOptions(model=model, direction=direction, out=tmp_path / "out", quiet=True))
    for source in (model, None):
        report = verify(VerifyOptions(out=tmp_path / "out", direction=direction, source=source, quiet=True))
        assert report.ok, [str(f) for f in report.failures]


def test_a_changed_unpatched_tensor_fails_with_source(made, out_copy) -> None:
    model, direction, _ = made
    shard = shard_of(out_copy, Q_PROJ)
    w = load(shard, Q_PROJ)
    w.view(torch.int16)[3, 5] ^= 1
    store(shard, Q_PROJ, w)
    result = run_verify(out_copy, direction, model)
    assert result.exit_code == 1
    assert error_lines(result) == [f"orthopatch: error: {shard}: tensor '{Q_PROJ}': differs from the source "
                                   f"(first at byte {(3 * TINY.hidden + 5) * 2} of the tensor), but it is not patched"]
    assert run_verify(out_copy, direction).exit_code == 0  # nothing to compare it with


def test_an_unpatched_copy_fails_without_source(made, out_copy) -> None:
    model, direction, _ = made
    shard = shard_of(out_copy, O_PROJ)
    store(shard, O_PROJ, load(shard_of(model, O_PROJ), O_PROJ))
    for source in (None, model):
        result = run_verify(out_copy, direction, source)
        assert result.exit_code == 1
        lines = error_lines(result)
        assert len(lines) == 1 and f"{shard}: tensor '{O_PROJ}': " in lines[0], result.stderr
    assert "component along the direction" in error_lines(run_verify(out_copy, direction))[0]


def exact_elements(model: Path, out: Path, direction: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The output tensor and a mask of its elements equal to the correctly rounded float64 result."""
    src, got = load(shard_of(model, name), name), load(shard_of(out, name), name)
    r = torch.load(direction).to(torch.float64)
    expected = reference(src, r / r.norm(), axis=0).to(got.dtype)
    return got, (got == expected) & (got != 0)


def test_ulps_are_counted(made, out_copy) -> None:
    model, direction, _ = made
    shard = shard_of(out_copy, DOWN)
    w, exact = exact_elements(model, out_copy, direction, DOWN)
    picks = exact.flatten().nonzero().flatten()
    allowed = -(-w.numel() // 1000)

    def bump(count: int, by: int) -> None:
        t = w.clone()
        t.view(torch.int16).view(-1)[picks[:count]] += by
        store(shard, DOWN, t)

    bump(2, 1)  # a couple of elements one ulp off: within the rule
    assert run_verify(out_copy, direction, model).exit_code == 0
    bump(allowed + 1, 1)
    result = run_verify(out_copy, direction, model)
    assert result.exit_code == 1 and "one ulp from the correctly rounded result" in result.stderr
    bump(1, 2)
    result = run_verify(out_copy, direction, model)
    assert result.exit_code == 1 and "more than one ulp" in result.stderr
    assert f"tensor '{DOWN}'" in error_lines(result)[0]


def test_another_direction_fails(made, tmp_path) -> None:
    model, _, out = made
    other = tmp_path / "other.pth"
    save_direction(other, TINY.hidden, seed=9)
    result = run_verify(out, other, model)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert lines[0].endswith("is not the direction file this output was made with "
                             "(its sha256 differs from the record's)")
    assert len(lines) == 2 + 2 * TINY.layers  # and every patched tensor is named
    assert len(error_lines(run_verify(out, other))) == 2 + 2 * TINY.layers


def test_an_unfinished_folder_fails(made, out_copy) -> None:
    _, direction, _ = made
    (out_copy / RECORD_NAME).unlink()
    (out_copy / PARTIAL_NAME).write_text("{}")
    (out_copy / ".model-00002-of-00008.safetensors.orthopatch-tmp").write_bytes(b"half")
    result = run_verify(out_copy, direction)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 3
    assert "no orthopatch.json" in lines[0] and "interrupted run's marker" in lines[1]
    assert "temporary file" in lines[2]


@pytest.mark.parametrize("damage", ["truncated", "missing-shard", "index-extra-tensor", "header-dtype", "config"])
def test_structural_damage_is_one_line(made, out_copy, damage: str) -> None:
    model, direction, _ = made
    index_path = out_copy / "model.safetensors.index.json"
    shard = shard_of(out_copy, DOWN)
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "missing-shard":
        shard.unlink()
    elif damage == "index-extra-tensor":
        index = json.loads(index_path.read_text())
        index["weight_map"]["model.layers.9.mlp.down_proj.weight"] = shard.name
        index_path.write_text(json.dumps(index))
    elif damage == "header-dtype":
        data = shard.read_bytes()
        q = data.index(b'"model.layers.2.mlp.up_proj.weight"')
        at = data.index(b'"BF16"', q)
        shard.write_bytes(data[:at] + b' "F16"' + data[at + 6:])  # same length, still valid JSON
    elif damage == "config":
        config = json.loads((out_copy / "config.json").read_text())
        config["rms_norm_eps"] = 1e-3
        (out_copy / "config.json").write_text(json.dumps(config))
    result = run_verify(out_copy, direction, model)
    assert result.exit_code == 1, result.output
    lines = error_lines(result)
    assert lines and all("\n" not in line for line in lines)
    assert "Traceback" not in result.output
    last = read_header(shard_of(made[2], DOWN)).tensors[-1].name  # truncation cuts the last tensor
    expected = {"truncated": [str(shard), last], "missing-shard": [str(index_path), shard.name],
                "index-extra-tensor": [str(index_path), "model.layers.9.mlp.down_proj.weight"],
                "header-dtype": [str(shard), "model.layers.2.mlp.up_proj.weight", "F16"],
                "config": [str(out_copy / "config.json")]}[damage]
    assert all(word in lines[0] for word in expected), lines


def test_verify_waits_for_no_one_while_apply_writes(made, out_copy) -> None:
    _, direction, _ = made
    fd = os.open(out_copy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running apply holds
        with pytest.raises(OrthopatchError, match="writing to this folder"):
            verify(VerifyOptions(out=out_copy, direction=direction, quiet=True))
    finally:
        os.close(fd)
    assert verify(VerifyOptions(out=out_copy, direction=direction, quiet=True)).ok


def test_a_missing_folder_is_one_line(tmp_path, made) -> None:
    line = one_error_line(run_verify(tmp_path / "nothing", made[1]))
    assert line == f"orthopatch: error: {tmp_path / 'nothing'}: not a folder"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_ulp_is_the_spacing_of_the_stored_dtype(dtype) -> None:
    values = torch.tensor([1.0, -1.5, 3e-3, 1e-30, 0.0, 6e4], dtype=torch.float64).to(dtype)
    values = values[torch.isfinite(values)]
    ints = values.view(INT_VIEWS[dtype])
    step = torch.where(values < 0, -1, 1).to(ints.dtype)
    following = (ints + step).view(dtype).to(torch.float64)
    spacing = (following - values.to(torch.float64)).abs()
    assert torch.equal(ulp(values.to(torch.float64), dtype), spacing)


def test_the_tally_separates_near_from_bad() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0, 1e-6], dtype=torch.float64)
    out = ref.to(torch.bfloat16).to(torch.float64)
    out[1] = 2.0 + 2 ** -6  # one bf16 ulp at 2.0
    tally = RoundingTally(torch.bfloat16)
    tally.add(out, ref, ref.abs(), 0)
    assert (tally.near, tally.bad) == (1, 0)
    out[2] = 3.0 + 2 * 2 ** -6
    tally.add(out, ref, ref.abs(), 4)
    assert tally.bad == 1 and tally.first_bad == (6, 3.03125, 3.0)
    cancel = RoundingTally(torch.bfloat16)  # a tiny result off by far more than its ulp, but not by float32 noise
    cancel.add(torch.tensor([1e-7], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
               torch.tensor([1.0], dtype=torch.float64), 0)
    assert cancel.bad == 0


def test_demo_uses_verify(tmp_path) -> None:
    from orthopatch.demo import run_demo

    lines = run_demo(tmp_path, quiet=True)
    assert any("verified" in line for line in lines)
    assert any("before -> after" in line for line in lines)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["options"].update(layers="most"), "cannot read the options it records (layers 'most')"),
    (lambda r: r["tensors_patched"].pop(), "the record lists 6 patched tensors where the plan has 7"),
    (lambda r: r["options"].update(embeddings=False), "the record lists 7 patched tensors where the plan has 6"),
], ids=["bad-options", "fewer-tensors", "other-options"])
def test_a_record_that_disagrees_fails(made, out_copy, edit, message: str) -> None:
    _, direction, _ = made
    record = json.loads((out_copy / RECORD_NAME).read_text())
    edit(record)
    (out_copy / RECORD_NAME).write_text(json.dumps(record))
    result = run_verify(out_copy, direction)
    assert result.exit_code == 1
    assert any(message in line and str(out_copy / RECORD_NAME) in line for line in error_lines(result)), result.stderr


def test_reads_are_bounded_blocks(made, monkeypatch) -> None:
    """Never a whole tensor, let alone a shard: every read is a block of at most ``chunk_elements``."""
    from orthopatch.verify import reference

    model, direction, out = made
    sizes: list[int] = []
    real_raw, real_read = reference.RawReader.raw, reference.TensorFile.read

    def raw(self, offset: int, nbytes: int, tensor: str):
        sizes.append(nbytes)
        return real_raw(self, offset, nbytes, tensor)

    def read(self, name, index):
        block = real_read(self, name, index)
        sizes.append(block.numel() * self.dtype(name).itemsize)
        return block

    monkeypatch.setattr(reference.RawReader, "raw", raw)
    monkeypatch.setattr(reference.TensorFile, "read", read)
    monkeypatch.setattr(reference, "COMPARE_BYTES", 4096)
    chunk = 2 * TINY.intermediate  # two rows of a down_proj block, a fraction of a row of nothing
    for source in (model, None):
        assert verify(VerifyOptions(out=out, direction=direction, source=source, quiet=True, chunk_elements=chunk)).ok
    largest_tensor = max(t.nbytes for p in out.glob("*.safetensors") for t in read_header(p).tensors)
    assert max(sizes) <= max(4096, chunk * 2) < largest_tensor
