import pytest

SEEDS = range(5)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path
