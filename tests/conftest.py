import os

import pytest
import torch

# Triton kernels run on CPU tensors under its interpreter. The flag is read when kernels are
# decorated, so it must be set before any effattn.kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Each test starts from the same seed; two threads match the project's CI machine."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
