import pytest
import torch


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thr")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)
