"""Fixtures shared by every test module, and the ``gpu`` marker's skip on machines without CUDA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

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
