"""Indexing past 2**31 elements: bfloat16 tensors of about 2.2e9 elements, eval mode.

The kernels' offsets must be 64-bit where a tensor needs it. A full-size oracle does
not fit in memory, so each check uses locality: in eval mode each image of the batch
is computed independently, so the reference (float64) run on the first and the last
image alone gives the exact expected values there; the last image lies past element
2**31 of both the input and (for the depthwise and pointwise blocks) the output.

CPU: the depthwise block of the ``cpu`` backend (its own C++ indexing, input and output
past 2**31), when the machine has the memory (an input and an output of 4.4 GB each;
skipped otherwise); the GEMM blocks' big operands go through ATen's GEMM there. GPU:
every op on every GPU backend, forward, and the depthwise block's input gradient
(skipped without a GPU).
"""
from __future__ import annotations

import os

import pytest
import torch

import convmixer_kernels as ck

from conftest import assert_close_to_oracle, backends_under_test, has_cuda

NEED_GB = 12


def _available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2 ** 20
    except (OSError, KeyError, ValueError):
        return 0.0


def _params(op: str, c_in: int, c_out: int, k: int, device) -> dict:
    g = torch.Generator().manual_seed(7)
    shape = {"dw_block": (c_out, 1, k, k), "pw_block": (c_out, c_in, 1, 1),
             "patch_embed": (c_out, c_in, k, k)}[op]
    p = {"weight": torch.randn(shape, generator=g) / k,
         "bias": torch.rand(c_out, generator=g) - 0.5,
         "bn_weight": torch.rand(c_out, generator=g) + 0.5,
         "bn_bias": torch.rand(c_out, generator=g) - 0.5,
         "running_mean": torch.rand(c_out, generator=g) - 0.5,
         "running_var": torch.rand(c_out, generator=g) + 0.5}
    return {n: t.to(device) for n, t in p.items()}


def _big_input(shape, device) -> torch.Tensor:
    x = torch.empty(shape, dtype=torch.bfloat16, device=device)
    assert x.numel() > 2 ** 31
    return x.uniform_(-2.0, 2.0, generator=torch.Generator(device).manual_seed(3))


def _given(params: dict) -> dict:
    """What the block is called with: conv parameters in x's dtype (bfloat16)."""
    return {n: (t.to(torch.bfloat16) if n in ("weight", "bias") else t) for n, t in params.items()}


def _check_ends(fn, x, out, given, name: str) -> None:
    """The first and the last image of the batch against the reference on that image."""
    kw = {n: t.cpu() for n, t in given.items()}
    for i in (0, x.shape[0] - 1):
        xi = x[i:i + 1].cpu()
        want = fn(xi.double(), **{n: t.double() for n, t in kw.items()}, backend="reference")
        lowp = fn(xi, **kw, backend="reference")
        assert_close_to_oracle(f"{name} image {i}", out[i:i + 1].cpu(), want, lowp)


OPS = {  # op -> (functional, input shape, c_out, k or p); the input has > 2**31 elements
    "dw_block": (ck.dw_block, (4200, 16, 180, 180), 16, 9),
    "pw_block": (ck.pw_block, (4200, 16, 180, 180), 2, 1),  # a small output: the GEMM's float32
    #                                                      result must fit beside the input
    "patch_embed": (ck.patch_embed, (14300, 3, 224, 224), 8, 7),
}


def _run(op: str, backend: str, device: str) -> None:
    fn, shape, c_out, k = OPS[op]
    x = _big_input(shape, device)
    given = _given(_params(op, shape[1], c_out, k, device))
    out = fn(x, **given, backend=backend)
    _check_ends(fn, x, out, given, f"{op} {backend} {device}")


def test_past_2_31_elements_cpu():
    op = "dw_block"
    if "cpu" not in backends_under_test("cpu", op, torch.bfloat16):
        pytest.fail("the cpu backend is not built")
    gb = _available_gb()
    if gb < NEED_GB:
        pytest.skip(f"needs {NEED_GB} GB of free memory, {gb:.1f} GB available")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))
    try:
        _run(op, "cpu", "cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", sorted(OPS))
def test_past_2_31_elements_cuda(op):
    for backend in backends_under_test("cuda", op, torch.bfloat16):
        if backend == "reference":
            continue
        _run(op, backend, "cuda")
        torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
def test_past_2_31_elements_cuda_backward():
    """Eval-mode backward of the depthwise block: the last image's input gradient."""
    _, shape, c_out, k = OPS["dw_block"]
    for backend in backends_under_test("cuda", "dw_block", torch.bfloat16):
        if backend == "reference":
            continue
        x = _big_input(shape, "cuda").requires_grad_()
        lowp = _given(_params("dw_block", shape[1], c_out, k, "cuda"))
        out = ck.dw_block(x, **lowp, backend=backend)
        dy = torch.empty_like(out).uniform_(-1, 1, generator=torch.Generator("cuda").manual_seed(5))
        del out
        (dx,) = torch.autograd.grad(ck.dw_block(x, **lowp, backend=backend), x, dy)
        xl = x.detach()[-1:].cpu()
        xc = xl.double().requires_grad_()
        want = ck.dw_block(xc, **{n: t.cpu().double() for n, t in lowp.items()}, backend="reference")
        (gx,) = torch.autograd.grad(want, xc, dy[-1:].cpu().double())
        xl.requires_grad_()
        lp = ck.dw_block(xl, **{n: t.cpu() for n, t in lowp.items()}, backend="reference")
        (gl,) = torch.autograd.grad(lp, xl, dy[-1:].cpu())
        assert_close_to_oracle(f"dw_block dx {backend} last image", dx[-1:].cpu(), gx, gl)
        del x, dx
        torch.cuda.empty_cache()
