import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("MPLBACKEND", "agg")


@pytest.fixture(autouse=True)
def _seed_and_one_thread(torch_seeded_one_thread):
    yield


@pytest.fixture
def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    )
