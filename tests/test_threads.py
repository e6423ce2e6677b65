"""quantkit.threads.single_thread: one intra-op thread inside, the caller's count restored after."""

import pytest
import torch

from quantkit.threads import single_thread


def test_one_thread_inside_and_the_count_restored_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError):
            with single_thread():
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with single_thread(active=False):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
