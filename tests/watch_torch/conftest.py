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


@pytest.fixture(autouse=True, params=["later", "in-hook"])
def summarise_when(request, monkeypatch):
    """Every watch test here runs twice: layer outputs and output gradients summarised at the end of the forward
    or at the step (small tensors, copied), and summarised in their hooks and read in place (large tensors; here
    every tensor, by lowering the thresholds to one element)."""
    if request.param == "in-hook":
        from gradsight.frameworks.torch import _summary, _watch

        monkeypatch.setattr(_watch.Watch, "_now_elements", 1)
        monkeypatch.setattr(_summary, "_ALONE", 1)
    return request.param
