"""Fixtures shared by every test module, and the ``gpu`` marker's skip on machines without CUDA."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from orthopatch.gguf import native
from tests.helpers import Converted, model_and_reference, untouched


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: without it they are skipped, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Converted]:
    """The tiny Llama (with a nested model file), its direction and an uninterrupted run's output,
    shared read-only by the whole session: a test that changes any of them fails at the end."""
    root = tmp_path_factory.mktemp("converted")
    made = model_and_reference(root)
    with untouched(root):
        yield made


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_models(kind)``: a random tiny model of that family with a tokenizer, built once per session."""
    pytest.importorskip("transformers")
    from tests.tiny_models import save_tiny_model

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            save_tiny_model(folder, kind)
            built[kind] = folder
        return built[kind]

    return get


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """``(folder, r)``: the tiny Llama that refuses along the known unit direction ``r``."""
    pytest.importorskip("transformers")
    from tests.planted import save_planted_model

    folder = tmp_path_factory.mktemp("planted") / "model"
    return folder, save_planted_model(folder)


@pytest.fixture(params=["c", "numpy"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the C quantizers and again with the numpy ones (``ORTHOPATCH_NATIVE=0``)."""
    if request.param == "numpy":
        monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
    else:
        monkeypatch.delenv(native.DISABLE_VARIABLE, raising=False)
        if (reason := native.unavailable_reason()) is not None:
            pytest.skip(f"the C quantizers are unavailable here: {reason}")
    return request.param
