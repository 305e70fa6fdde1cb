import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on an oversubscribed shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
