from __future__ import annotations

import pytest

from quicknet import data


@pytest.fixture(scope="session")
def cifar() -> data.Dataset:
    """The real CIFAR-10 JPEG copy from ../shared/data (decoded once, then cached)."""
    return data.load()


@pytest.fixture(scope="session")
def test_images(cifar: data.Dataset) -> data.Split:
    return cifar.test.sample(512, seed=7)
