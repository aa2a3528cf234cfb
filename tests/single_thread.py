"""An autouse fixture for test modules that train tiny models: one torch thread.

Tiny models gain nothing from intra-op threads, and on a machine whose cores are
busy with other work, two spinning threads make each step many times slower.
Import it into a test module: ``from single_thread import one_torch_thread  # noqa: F401``.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
