import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; the switch is read when a kernel is
# decorated, so it is set here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The tiny random Llama of ``tests.tiny_models`` loaded on the CPU, once per module."""
    from quantrt.loader import load
    from tests.tiny_models import make_tiny_model

    return load(make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama"), device="cpu",
                progress=False)


@pytest.fixture(scope="session")
def demo_gguf():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched once into the cache)."""
    from quantrt.demo import ensure_demo

    return ensure_demo(quiet=True)


def pytest_collection_modifyitems(config, items):
    # GPU tests run only where a GPU exists (the device tool); on CPU CI they are skipped
    # with a reason instead of failing.
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
