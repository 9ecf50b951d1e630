"""Test-wide fixtures.

One torch thread for every test: tiny models are overhead-bound, and with two threads on a shared
2-core machine every small op waits for the other core whenever another process holds it
(seconds per test instead of milliseconds). A test that changes the thread count (a stage's
run.threads) gets it put back.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
