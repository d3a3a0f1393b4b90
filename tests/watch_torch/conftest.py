import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("MPLBACKEND", "agg")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One intra-op thread: on a shared 2-core machine, OpenMP barriers stall for milliseconds whenever the run
    # writer's thread (or another process) holds the second core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    )
