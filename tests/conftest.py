import os
import sys

import pytest
import torch

# make tests/_dist.py importable as `_dist` and the package importable without installing
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Codec work on one intra-op thread, as each rank runs it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
