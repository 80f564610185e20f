"""Test setup: without a CUDA device, Triton kernels run in its CPU interpreter; ``gpu`` tests skip."""

import os

import pytest
import torch
from hypothesis import settings

# The test gate must not flake: hypothesis draws the same examples on every run unless asked to explore
# (HYPOTHESIS_PROFILE=explore draws fresh ones, as a random search for new failing cases).
settings.register_profile("gate", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gate"))

# Must happen before anything imports triton: @triton.jit reads it when a kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from otlabel.backends.triton import triton_installed  # noqa: E402 (reads the package metadata; imports no Triton)

# POT (imported by some tests) would import JAX, which takes 75% of a GPU's memory: see otlabel.exact.import_pot.
from otlabel.exact import POT_OPTIONAL_BACKENDS  # noqa: E402 (after TRITON_INTERPRET; imports no Triton)

for _switch in POT_OPTIONAL_BACKENDS.values():
    os.environ.setdefault(_switch, "1")

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = triton_installed()  # an optional extra (Triton >= 3.0, as otlabel checks it): its tests skip without


@pytest.fixture(autouse=True)
def torch_settings_restored():
    """Each test leaves torch's thread count and deterministic-algorithms mode as it found them. Code that scripts run
    sets them for their process, and tests call it in this one: the example trainers' main() (``--threads``,
    deterministic algorithms), benchmarks/cpu_loops.py's (one thread). Left at one thread, every later solve split
    its rows otherwise, and a streamed solve's measured error, noise at the float32 floor, dipped below a tol of 1e-9
    that test_validation expects it to miss."""

    def deterministic():
        return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()

    threads, mode = torch.get_num_threads(), deterministic()
    yield
    if torch.get_num_threads() != threads:  # only where changed: setting it turns MKL's dynamic threads off
        torch.set_num_threads(threads)
    if deterministic() != mode:
        torch.use_deterministic_algorithms(mode[0], warn_only=mode[1])


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpreter = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (no GPU)")
    skip_no_triton = pytest.mark.skip(reason="runs Triton kernels: needs Triton (otlabel[triton]), not installed")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRETED:
            item.add_marker(skip_interpreter)
        if "interpreter" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_no_triton)


if HAS_CUDA and os.environ.get("OTLABEL_GPU_MEMLOG"):
    # On a GPU machine, one line per test: free device memory and what this process's allocator holds, to find a
    # test that keeps memory from the others (pytest-xdist runs several processes on one GPU).

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(item, nextitem):
        free, total = torch.cuda.mem_get_info()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.environ["OTLABEL_GPU_MEMLOG"], "a") as log:
            log.write(
                f"{worker} {item.nodeid} free_MiB={free >> 20} reserved_MiB={torch.cuda.memory_reserved() >> 20}\n"
            )
