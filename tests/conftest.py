import os

# No GPU where the suite runs: Triton kernels, when a test forces them, run in Triton's interpreter.
# Set before any module defines a kernel (triton.jit reads it at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: they gain nothing from threads, and on a shared
    CPU competing threads are very slow. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every kernel test that takes ``device`` runs on the CPU (Triton through its interpreter) and, on a
# machine with a GPU, again on CUDA with the compiled kernels.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
