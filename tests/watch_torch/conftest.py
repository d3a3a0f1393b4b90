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


@pytest.fixture(autouse=True, params=["later", "in-hook", "uncompiled"])
def summarise_when(request, monkeypatch):
    """Every watch test here runs three times: layer outputs and output gradients summarised at the end of the
    forward or at the step (small tensors, copied); summarised in their hooks and read in place (large tensors;
    here every tensor, by lowering the thresholds to one element); and as the first, without the compiled kernels
    (gradsight._ckernels, as where no C compiler was there at install time: numpy/torch kernels and torch norms)."""
    if request.param == "in-hook":
        from gradsight.frameworks.torch import _summary, _watch

        monkeypatch.setattr(_watch.Watch, "_now_elements", 1)
        monkeypatch.setattr(_summary, "_ALONE", 1)
    if request.param == "uncompiled":
        from gradsight import _kernels

        monkeypatch.setattr(_kernels, "_C", None)
    return request.param
