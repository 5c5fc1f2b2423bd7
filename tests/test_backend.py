"""The backend seam (csrc/backend/): the forward pass calls a Backend; CpuBackend runs it here.
`device=` is checked at load with an error for each reason it cannot run: an unknown device, a
build without CUDA, no GPU visible (this machine), and, with a GPU, the CUDA forward pass that is
not written yet. The CUDA kernels themselves are tested in test_cuda.py."""
from __future__ import annotations

import pytest

import flashmem
from flashmem import _core


def test_default_backend_is_the_cpu(smollm2_gguf):
    m = flashmem.load(smollm2_gguf, threads=1, max_context=64)
    assert m.device == "cpu" and m._engine.backend == "cpu"
    assert m.generate("The capital of France is", max_new_tokens=3).text


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", "", 0, None])
def test_unknown_device_names_the_argument(smollm2_gguf, device):
    with pytest.raises(ValueError, match="device"):
        flashmem.load(smollm2_gguf, threads=1, max_context=64, device=device)


@pytest.mark.skipif(_core.cuda_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_says_why(smollm2_gguf):
    expected = (RuntimeError, "no CUDA device is visible") if _core.cuda_built() else (ValueError, "built without CUDA")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(expected[0], match=expected[1]):
            flashmem.load(smollm2_gguf, threads=1, max_context=64, device=device)
