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

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
