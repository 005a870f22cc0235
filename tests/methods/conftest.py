import pytest
import torch


@pytest.fixture
def one_thread():
    """Deterministic float summation order (and no oversubscription of the 2 CI cores) for a test module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
