"""Shared test fixtures: the read-only data folder beside the checkout, and a few structures."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Structure

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    warnings.filterwarnings("ignore", message=".*fractional coordinates rounded.*")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op torch thread: on 2 shared cores torch's thread pool only adds overhead (measured up to 10x)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def assert_jacobian_matches_differences(recipe, names: list[str], relative_step: float = 1e-6) -> None:
    """Every column of ``recipe.jacobian`` at its current free parameters (named ``names``) equals central finite
    differences of ``recipe.residual`` (step ``relative_step`` times the value, at least that times 0.01), and
    none is identically zero."""
    x = recipe.parameters.vector()
    jac = recipe.jacobian(x)
    for i, name in enumerate(names):
        h = relative_step * max(abs(x[i]), 1e-2)
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        numeric = (recipe.residual(up) - recipe.residual(down)) / (2 * h)
        assert np.abs(numeric).max() > 0, name
        assert np.allclose(jac[:, i], numeric, rtol=1e-4, atol=1e-6 * np.abs(numeric).max() + 1e-9), name


def read_structures(path: Path, n: int, seed: int = 0) -> list[Structure]:
    """``n`` structures drawn at random (seeded) from a csv.gz structure set."""
    frame = pd.read_csv(path, keep_default_na=False, usecols=["material_id", "cif"])
    rows = frame.sample(n=n, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in rows.cif]


@pytest.fixture(scope="session")
def mp20_sample(shared_data) -> list[Structure]:
    """100 random MP-20 test structures (seed 0)."""
    return read_structures(shared_data / "structures" / "mp20_test.csv.gz", 100)


@pytest.fixture(name="rocksalt")
def rocksalt_fixture() -> Structure:
    from prototypes import rocksalt

    return rocksalt()
