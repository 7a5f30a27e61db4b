import os

# No GPU where the suite runs: Triton kernels, when a test forces them, run in Triton's interpreter.
# Set before any module defines a kernel (triton.jit reads it at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (.ci/run starts one worker per core) each worker and what it starts keep to one
# OpenMP thread: more threads than cores make torch's spinning threads many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture
def triton_on_cpu_needs_interpreter(request):
    """A GPU run (TRITON_INTERPRET=0) skips the tests that put Triton on CPU tensors; those taking
    ``device`` run on CUDA instead. Use with ``pytest.mark.usefixtures``."""
    from rearec_kernels.backend import interpreting

    if not interpreting() and "triton" in request.node.name.lower() and "device" not in request.fixturenames:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


@pytest.fixture
def poisoned_kernel_outputs():
    """Kernel scratch (outputs included) filled with NaN, so a value a kernel fails to write shows."""
    from rearec_kernels.backend import poisoned_scratch

    with poisoned_scratch():
        yield


# What the paper's public code computes for one small model (tests/golden/README.md); written by
# scripts/make_golden.py. Committed with the tests: a missing file is an error, never a skip.
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "official_rearec_small.safetensors")


@pytest.fixture(scope="session")
def golden():
    """The golden as a dict: 'config' and 'source' (dicts), 'state_dict' (their key names), every other
    tensor under its own name, and 'histories': the batch as lists, oldest item first (theirs is
    left-padded)."""
    import json

    from safetensors import safe_open

    if not os.path.isfile(GOLDEN):
        pytest.fail(f"{GOLDEN} is missing: it is part of the repository (regenerate it with scripts/make_golden.py)")
    with safe_open(GOLDEN, framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    golden = {"config": json.loads(metadata["config"]), "source": json.loads(metadata["source"]), "state_dict": {}}
    for name, tensor in tensors.items():
        if name.startswith("state_dict."):
            golden["state_dict"][name[len("state_dict."):]] = tensor
        else:
            golden[name] = tensor
    seq, lengths = golden["item_seq"], golden["item_seq_len"].tolist()
    golden["histories"] = [row[len(row) - n:] for row, n in zip(seq.tolist(), lengths)]
    return golden


def skip_without(what: str, reason: str) -> None:
    """Skip a test whose optional dependency ``what`` (a wheel: RecBole, its datasets) is missing;
    where the environment says every dependency is installed (``REAREC_REQUIRE_TEST_DEPS=1``, as
    ``.ci/run`` sets), fail instead, so that a broken install cannot pass as skipped tests."""
    message = f"{what}: {reason}"
    if os.environ.get("REAREC_REQUIRE_TEST_DEPS") == "1":
        pytest.fail(message + " (REAREC_REQUIRE_TEST_DEPS=1: this run needs it installed)")
    pytest.skip(message)


def compile_subprocess_env(tmp) -> dict:
    """The environment of a subprocess that compiles Triton kernels for an absent GPU (the stand-in
    driver): without the interpreter this conftest turns on, a Triton cache in ``tmp``, one thread."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               OMP_NUM_THREADS="1")
    return env


def gpu_tiles(module, config_of) -> list:
    """Every tile, ``(BLOCK_M, BLOCK_N)`` or ``(BLOCK_N,)``, that ``config_of(head_dim, dtype)`` of the
    kernel ``module`` gives a GPU launch: head dims 1..256, each dtype (the interpreter gets its own)."""
    import unittest.mock

    with unittest.mock.patch.object(module, "interpreting", lambda: False):
        configs = [config_of(hd, dtype) for hd in range(1, 257)
                   for dtype in (torch.float32, torch.float16, torch.bfloat16)]
    return sorted({tuple(c[name] for name in ("BLOCK_M", "BLOCK_N") if name in c) for c in configs})


def counting_bf16_products(seen):
    """A subclass of ``rearec_kernels.bf16_products.Bf16ProductsAsFloat32`` that counts, in the Counter
    ``seen``, each all-bf16 product it runs as float32, by op name (mm, addmm, bmm, baddbmm)."""
    from rearec_kernels.bf16_products import PRODUCTS, Bf16ProductsAsFloat32

    class Counting(Bf16ProductsAsFloat32):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in PRODUCTS and args[0].dtype == torch.bfloat16:
                seen[func.overloadpacket.__name__] += 1
            return super().__torch_dispatch__(func, types, args, kwargs)
    return Counting


# The modules that take longest (minutes of ptxas, an end-to-end GPU check in the interpreter) go first,
# so that under pytest-xdist (.ci/run) the other worker runs the rest beside them instead of one worker
# finishing them alone at the end. Order only: every test still runs.
SLOW_MODULES_FIRST = ("test_gpu_compile.py", "test_gpu_check.py", "test_heap.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return SLOW_MODULES_FIRST.index(name) if name in SLOW_MODULES_FIRST else len(SLOW_MODULES_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order
