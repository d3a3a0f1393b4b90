"""Suite-wide test settings (headless matplotlib, quiet TensorFlow, a hypothesis profile for 2-core CI) and the
framework fixtures shared by every pillar's tests (each skips its test when the framework is missing)."""

import os

os.environ.setdefault("MPLBACKEND", "agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("ci")


@pytest.fixture
def torch():
    """The ``torch`` module; the test is skipped where PyTorch is not installed."""
    return pytest.importorskip("torch")


@pytest.fixture
def keras():
    """The ``keras`` module on the TensorFlow backend; the test is skipped where TensorFlow is not installed."""
    pytest.importorskip("tensorflow")
    return pytest.importorskip("keras")


@pytest.fixture
def torch_seeded_one_thread(torch):
    """Seed 0 and one intra-op thread for the test, restored afterwards.

    One thread: on a shared 2-core machine, OpenMP barriers stall for milliseconds whenever the run writer's
    thread (or another process) holds the second core.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
