"""The Triton kernels of pw_block and patch_embed (convmixer_kernels/_triton/_gemm.py)
against ``convmixer_kernels.reference.forward/backward``, called directly with the
backend contract's arguments (under ``TRITON_INTERPRET=1`` on a machine without a GPU).

Beyond the block grid of test_blocks.py: every output mask (the patch embedding's image
gradient not requested included), the recompute path of an unsaved pre-activation,
absent bias / BatchNorm parameters, many tiles in every GEMM dimension (small forced
tiles: the grouped tile order, the K loop, the cross-tile statistics and the split
weight-gradient reduction), the int32 offset path, bitwise reproducibility, NaN
propagation, and the host code on ``meta`` tensors (what the ahead-of-time compile
check runs).
"""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from convmixer_kernels.spec import SPECS
from convmixer_kernels import backends
from convmixer_kernels.spec import (out_format_name, out_memory_format,
                                     output_memory_format, stats_dtype)

from test_cpu_gemm_blocks import (MASKS, check, check_fresh, make_args, ref_backward,
                                  ref_forward, ref_forward_from, to64)

# CUDA tensors on a GPU machine, else CPU tensors under Triton's interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_reason = backends.get("triton").unavailable("pw_block", torch.empty(1, 1, 1, 1, device=DEVICE))
pytestmark = pytest.mark.skipif(_reason is not None,
                                reason=f"triton backend unavailable: {_reason}")

OPS = ("pw_block", "patch_embed")
LAYOUTS = ("nchw", "channels_last", "strided")

# (N, Cin, H, W, Cout, p); patch shapes include trailing rows/columns no patch covers
SHAPES = {
    "pw_block": [(2, 3, 7, 13, 17, 1), (2, 17, 1, 1, 64, 1), (1, 64, 7, 7, 1, 1)],
    "patch_embed": [(2, 3, 13, 7, 8, 2), (2, 3, 7, 13, 17, 7), (3, 3, 13, 14, 20, 4)],
}
# Larger than one tile in every dimension once the tiles are forced small.
MULTI_TILE = {"pw_block": (1, 20, 5, 7, 18, 1), "patch_embed": (2, 2, 10, 11, 18, 3)}


def triton():
    return backends.get("triton")


def on_device(args):
    """make_args' tensors on DEVICE with their strides (strided views included)."""
    def move(t):
        if not isinstance(t, torch.Tensor) or t.device.type == DEVICE:
            return t
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE)
        return out.copy_(t)
    return [move(a) for a in args]


def args_for(shape, dtype, layout, training, case):
    return on_device(make_args(shape, dtype, layout, training, case))


def run_case(op, shape, dtype, layout, training, case, save_preact, masks=MASKS):
    be = triton()
    args = args_for(shape, dtype, layout, training, case)
    x, weight, bias, bn_w = args[:4]
    # the output layout the kernel is asked for: x's own or the other one, varying with
    # the case, the layout and the mode (tests/test_output_layout.py crosses them all)
    out_format = ("channels_last", "contiguous")[(case + LAYOUTS.index(layout) + training) % 2]
    fmt, in_fmt = out_memory_format(out_format), output_memory_format(x)
    got = be.block_forward(SPECS[op], *args, save_preact, out_format)
    z = got[3] if save_preact else be.block_forward(SPECS[op], *args, True, out_format)[3]

    want_z, want_z64 = ref_forward(op, args + [True])[3], ref_forward(op, to64(args) + [True])[3]
    check("preact", z, want_z, want_z64, dtype)
    if not save_preact:
        assert got[3].numel() == 0 and got[3].dtype == dtype
    want = ref_forward_from(op, args + [save_preact, out_format], z)
    want64 = ref_forward_from(op, to64(args) + [save_preact, out_format], z.double())
    for name, g, w, w64 in zip(("out", "mean", "var"), got, want, want64):
        check(name, g, w, w64, dtype)
    assert got[0].is_contiguous(memory_format=fmt)
    assert got[1].dtype == got[2].dtype == stats_dtype(x)
    if save_preact:
        assert got[3].is_contiguous(memory_format=fmt) and got[3].dtype == dtype
    check_fresh(got, args)

    grad = torch.randn(got[0].shape, dtype=torch.float64).to(dtype).to(DEVICE)
    if case % 2:
        grad = grad.contiguous(memory_format=torch.channels_last)  # read through its strides
    for m, mask in enumerate(masks):
        mask = [mask[0], mask[1], mask[2] and bias is not None, mask[3] and bn_w is not None,
                mask[4]]
        preact = z if save_preact and m % 2 == 0 else x.new_empty(0)
        bwd = [grad, x, weight, bias, bn_w, got[1], got[2], preact, training, 1e-5, args[9], mask]
        got_b = be.block_backward(SPECS[op], *bwd)
        bwd[7] = z
        want_b, want_b64 = ref_backward(op, bwd), ref_backward(op, to64(bwd))
        for i, name in enumerate(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias")):
            if not mask[i]:
                assert got_b[i].numel() == 0, f"{name}: masked out but not empty"
                continue
            check(f"{name} mask={mask}", got_b[i], want_b[i], want_b64[i], dtype)
        if mask[0]:
            assert got_b[0].is_contiguous(memory_format=in_fmt) and got_b[0].dtype == dtype
        if mask[1]:
            assert got_b[1].is_contiguous() and got_b[1].dtype == weight.dtype
        bwd[7] = preact
        check_fresh(got_b, bwd)


# float32 in every layout, each half dtype in a layout that changes with the shape
DTYPE_LAYOUTS = [(torch.float32, layout) for layout in LAYOUTS] + [
    (torch.bfloat16, None), (torch.float16, None)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_against_reference(op, dtype, layout, training):
    for case, shape in enumerate(SHAPES[op]):
        masks = [MASKS[(case + i) % len(MASKS)] for i in range(3)]
        lay = layout or LAYOUTS[(case + (dtype == torch.float16)) % len(LAYOUTS)]
        run_case(op, shape, dtype, lay, training, case, case % 2 == 1, masks)


def test_image_gradient_only_when_asked():
    """patch_embed without the image gradient runs no dgrad GEMM and returns an empty dx;
    the weight gradient is the same as with it."""
    from convmixer_kernels.backends.triton import _gemm
    args = args_for((2, 3, 13, 14, 8, 4), torch.float32, "nchw", True, 0)
    x, weight, bias, bn_w = args[:4]
    out, mean, var, z = triton().block_forward(SPECS["patch_embed"], *args, True, "channels_last")
    grad = torch.randn_like(out)
    common = [grad, x, weight, bias, bn_w, mean, var, z, True, 1e-5, args[9]]
    launched = []
    real = _gemm.launch

    def record(kernel, *a, **meta):
        launched.append(kernel)
        real(kernel, *a, **meta)

    with mock.patch.object(_gemm, "launch", record):
        without = triton().block_backward(SPECS["patch_embed"], *common, [False, True, True, True, True])
    assert _gemm._dgrad not in launched and _gemm._wgrad in launched
    assert without[0].numel() == 0
    full = triton().block_backward(SPECS["patch_embed"], *common, [True] * 5)
    assert full[0].shape == x.shape
    for a, b in zip(without[1:], full[1:]):
        assert torch.equal(a, b)


def small_tiles(splits=3):
    """Force 16 x 16 x 16 tiles, grouped order over 2 row tiles, and ``splits`` row
    ranges in the weight gradient: many programs in every dimension."""
    from convmixer_kernels.backends.triton import _gemm
    gemm = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4)
    elem = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4)
    return mock.patch.multiple(_gemm, gemm_config=lambda *a: dict(gemm),
                               elementwise_config=lambda *a: dict(elem),
                               wgrad_splits=lambda *a: splits)


@pytest.mark.parametrize("layout,training,save_preact", [
    ("nchw", True, True), ("channels_last", False, False), ("strided", True, False)])
@pytest.mark.parametrize("op", OPS)
def test_many_tiles(op, layout, training, save_preact):
    with small_tiles():
        run_case(op, MULTI_TILE[op], torch.float32, layout, training, 1, save_preact, MASKS[:2])


@pytest.mark.parametrize("op", OPS)
def test_default_tiles_several_row_tiles(op):
    """More rows than one interpreter tile holds: the statistics of several tiles combine."""
    shape = {"pw_block": (2, 3, 24, 25, 5, 1), "patch_embed": (1, 3, 70, 66, 6, 2)}[op]
    run_case(op, shape, torch.float32, "channels_last", True, 0, True, MASKS[:1])


@pytest.mark.parametrize("op", OPS)
def test_int32_offsets(op):
    """The int32 offset variant (what a GPU runs below 2**31 elements; the interpreter
    takes the int64 one by default) computes the same."""
    from convmixer_kernels.backends.triton import _gemm
    if _gemm.interpreting():
        x, weight = args_for(SHAPES[op][0], torch.float32, "nchw", True, 0)[:2]
        assert _gemm.use_int64(_gemm.Geometry(x, weight, torch.channels_last))
    with mock.patch.object(_gemm, "use_int64", lambda *a: False):
        run_case(op, SHAPES[op][0], torch.float32, "strided", True, 0, True, MASKS[:2])


@pytest.mark.parametrize("op", OPS)
def test_bitwise_reproducible(op):
    """Fixed-order reductions: two runs give bitwise-equal results, with many tiles and a
    split weight-gradient reduction."""
    args = args_for(MULTI_TILE[op], torch.float32, "nchw", True, 0)
    x, weight, bias, bn_w = args[:4]
    results = []
    with small_tiles():
        for _ in range(2):
            out, mean, var, z = triton().block_forward(SPECS[op], *args, True, "channels_last")
            grad = torch.linspace(-1, 1, out.numel(), device=DEVICE).reshape(out.shape)
            bwd = triton().block_backward(SPECS[op], grad, x, weight, bias, bn_w, mean, var, z, True, 1e-5,
                                    args[9], [True] * 5)
            results.append((out, mean, var, z, *bwd))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_nan_propagates_like_reference(op):
    args = args_for(SHAPES[op][0], torch.float32, "nchw", False, 0)
    args[0] = args[0].clone()
    args[0][1, 2, 3, 4] = float("nan")
    out = triton().block_forward(SPECS[op], *args, False, "contiguous")[0]
    want = ref_forward(op, args + [False])[0]
    assert torch.isnan(out).any()
    assert torch.equal(torch.isnan(out), torch.isnan(want))


@pytest.mark.parametrize("gpu_configs", [False, True], ids=["interpreter", "gpu"])
def test_host_code_runs_on_meta_tensors(gpu_configs):
    """Forward and backward on meta tensors with the launch recorder set (no data-dependent
    host logic, every launch recorded); with the GPU tile choices the variants of a whole
    training step stay few and every tile dim is a power of two >= 16."""
    from convmixer_kernels.backends.triton import _common, _gemm
    seen = []

    def record(kernel, grid, args, meta):
        assert all(isinstance(g, int) and g >= 1 for g in grid)
        seen.append((kernel, tuple(sorted(meta.items()))))

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_common, "_recorder", record))
        if gpu_configs:
            stack.enter_context(mock.patch.object(_gemm, "interpreting", lambda: False))
        for dt in (torch.bfloat16, torch.float32):
            for op, shape, p in (("pw_block", (64, 768, 32, 32), 1),
                                 ("patch_embed", (64, 3, 227, 224), 7)):
                for cl in (False, True):
                    x = torch.empty(shape, device="meta", dtype=dt)
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    w = torch.empty(768, shape[1], p, p, device="meta", dtype=dt)
                    b = torch.empty(768, device="meta", dtype=dt)
                    v = torch.empty(768, device="meta")
                    fmt = out_format_name(output_memory_format(x))  # as ConvMixer runs it
                    for train in (True, False):
                        out, mean, var, z = triton().block_forward(SPECS[op], x, w, b, v, v, v, v, train,
                                                             1e-5, "gelu", True, fmt)
                        assert out.shape == (64, 768, 32, 32)
                        assert out.is_contiguous(memory_format=output_memory_format(x))
                        for preact in (z, x.new_empty(0)):
                            r = triton().block_backward(SPECS[op], out, x, w, b, v, mean, var, preact, train,
                                                  1e-5, "gelu", [True] * 5)
                            assert r[0].shape == x.shape and r[1].shape == w.shape
    kernels = {k for k, _ in seen}
    assert kernels == {_gemm._fwd, _gemm._norm, _gemm._bwd_elem, _gemm._dgrad, _gemm._wgrad}
    if gpu_configs:
        variants = {v for v in seen}
        assert len(variants) <= 40, len(variants)
        for _, meta in seen:
            for key, val in meta:
                if key.startswith("BLOCK_"):
                    assert val >= 16 and val & (val - 1) == 0, (key, val)
