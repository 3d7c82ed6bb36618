"""The C++ depthwise-block kernels (cpu backend) against the reference backend directly:
forward and backward ops, saved or recomputed pre-activation, output masks, layouts,
and determinism across thread counts."""
from __future__ import annotations

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels.spec import SPECS
from convmixer_kernels import _cpp_lib, reference
from convmixer_kernels.spec import DW_BLOCK, output_memory_format

from conftest import make_input

pytestmark = pytest.mark.skipif(
    _cpp_lib.status() is not None or "cpu" not in ck.available_backends("cpu", "dw_block"),
    reason=f"cpu backend unavailable: {_cpp_lib.status()}")

CPU = ck.backends.get("cpu")
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative to the output scale


def args_for(shape, k, dtype, layout, training, save_preact, activation="gelu"):
    n, c, h, w = shape
    x = make_input(shape, dtype, layout)
    wt = (torch.randn(c, 1, k, k) / k).to(dtype)
    b = torch.randn(c).to(dtype)
    bw, bb = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = (None, None) if training else (torch.randn(c), torch.rand(c) + 0.5)
    return (x, wt, b, bw, bb, rm, rv, training, 1e-5, activation, save_preact)


def close(name, got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if want.numel() == 0:
        return
    scale = want.float().abs().max().item() + 1e-12
    err = (got.float() - want.float()).abs().max().item()
    print(f"{name}: err={err:.3e} scale={scale:.3e}")
    assert err <= TOL[dtype] * max(scale, 1.0), f"{name}: {err:.3e} > {TOL[dtype]} x {scale:.3e}"


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 19, 9, 13), 5), ((1, 3, 32, 32), 3), ((2, 17, 33, 5), 9)],
                         ids=str)
def test_forward_backward_match_reference(shape, k, dtype, layout, training, save_preact, activation):
    args = args_for(shape, k, dtype, layout, training, save_preact, activation)
    got = CPU.block_forward(SPECS["dw_block"], *args)
    want = reference.forward(DW_BLOCK, *args)
    for name, g, w in zip(("out", "mean", "var", "preact"), got, want):
        close(name, g, w, dtype)
    assert got[0].is_contiguous(memory_format=output_memory_format(args[0]))
    out, mean, var, preact = want
    grad = make_input(out.shape, dtype, "channels_last" if layout == "nchw" else "nchw")
    bargs = (grad, args[0], args[1], args[2], args[3], mean, var, preact, training, 1e-5, activation,
             [True] * 5)
    got_b = CPU.block_backward(SPECS["dw_block"], *bargs)
    want_b = reference.backward(DW_BLOCK, *bargs)
    for name, g, w in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"), got_b, want_b):
        close(name, g, w, dtype)


@pytest.mark.parametrize("mask", [[True, False, False, False, False], [False, True, True, False, False],
                                  [False, False, False, True, True], [False] * 5])
def test_backward_output_mask(mask):
    args = args_for((2, 5, 7, 6), 3, torch.float32, "nchw", True, True)
    out, mean, var, preact = reference.forward(DW_BLOCK, *args)
    bargs = (torch.randn_like(out), *args[:4], mean, var, preact, True, 1e-5, "gelu", mask)
    got = CPU.block_backward(SPECS["dw_block"], *bargs)
    want = reference.backward(DW_BLOCK, *bargs)
    for m, g, w in zip(mask, got, want):
        assert (g.numel() > 0) == m
        close("masked", g, w, torch.float32)
    ptrs = [g.data_ptr() for g in got if g.numel()]
    assert len(set(ptrs)) == len(ptrs)


def test_deterministic_across_thread_counts():
    """Reductions run per (n, c) plane and then over n in a fixed order."""
    args = args_for((4, 32, 16, 16), 7, torch.float32, "nchw", True, True)
    out, mean, var, preact = CPU.block_forward(SPECS["dw_block"], *args)
    bargs = (torch.randn_like(out), *args[:4], mean, var, preact, True, 1e-5, "gelu", [True] * 5)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append((CPU.block_forward(SPECS["dw_block"], *args), CPU.block_backward(SPECS["dw_block"], *bargs)))
    finally:
        torch.set_num_threads(threads)
    for fwd, bwd in results[1:]:
        for a, b in zip(fwd + bwd, results[0][0] + results[0][1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_wide_tiles_match_reference_and_narrow_tiles(layout, dtype, training):
    """channels_last tiles hold up to 8 blocks of 8 channels (tile_subs() in dw_block_tiles.h: as
    many as still leave 4 tiles per thread): 1 thread takes tiles of 64 + 4 channels here (the
    whole-line reader, then the per-channel one for the partial last block), 8 threads 1-block
    tiles. channel_slice is a channels_last view of channels 4..71 of a 76-channel tensor
    (pixels 76 channels apart)."""
    shape = (4, 68, 9, 11)
    args = list(args_for(shape, 5, dtype, "channels_last", training, True))
    if layout == "channel_slice":
        base = make_input((4, 76, 9, 11), dtype, "channels_last")
        args[0] = base[:, 4:72]
        assert args[0].stride(1) == 1 and not args[0].is_contiguous(memory_format=torch.channels_last)
    args = tuple(args)
    want = reference.forward(DW_BLOCK, *args)
    out, mean, var, preact = want
    grad = make_input(out.shape, dtype, "channels_last")
    bargs = (grad, args[0], args[1], args[2], args[3], mean, var, preact, training, 1e-5, "gelu", [True] * 5)
    want_b = reference.backward(DW_BLOCK, *bargs)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 8):
            torch.set_num_threads(t)
            results.append((CPU.block_forward(SPECS["dw_block"], *args), CPU.block_backward(SPECS["dw_block"], *bargs)))
    finally:
        torch.set_num_threads(threads)
    for fwd, bwd in results:
        for name, g, w in zip(("out", "mean", "var", "preact"), fwd, want):
            close(name, g, w, dtype)
        for name, g, w in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"), bwd, want_b):
            close(name, g, w, dtype)
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("view", ["crop", "channel_slice", "narrow"])
def test_nchw_row_views_match_reference(view, training):
    """float32 NCHW tiles go through an 8 x 8 transposing reader and writer (rows of 8 pixels
    of 8 channels, then the rest of the row one pixel at a time). Views with a row stride
    past W, a channel offset, and rows shorter than 8 pixels all take it (the gradients too)."""
    base = make_input((2, 40, 13, 23), torch.float32, "nchw")
    x = {"crop": base[:, 4:28, 1:12, 2:19], "channel_slice": base[:, 5:21], "narrow": base[:, 8:32, :, 3:8]}[view]
    assert x.stride(3) == 1 and not x.is_contiguous()
    args = list(args_for(tuple(x.shape), 5, torch.float32, "nchw", training, True))
    args[0] = x
    fwd, bwd, bargs = _run_fwd_bwd(tuple(args), "nchw")
    for name, g, w in zip(("out", "mean", "var", "preact"), fwd, reference.forward(DW_BLOCK, *args)):
        close(name, g, w, torch.float32)
    for name, g, w in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"), bwd, reference.backward(DW_BLOCK, *bargs)):
        close(name, g, w, torch.float32)


def _run_fwd_bwd(args, grad_layout="channels_last"):
    out, mean, var, preact = CPU.block_forward(SPECS["dw_block"], *args)
    grad = make_input(out.shape, out.dtype, grad_layout)
    bargs = (grad, args[0], args[1], args[2], args[3], mean, var, preact, args[7], 1e-5, args[9], [True] * 5)
    return (out, mean, var, preact), CPU.block_backward(SPECS["dw_block"], *bargs), bargs


@pytest.mark.parametrize("eval_after", [False, True], ids=["train", "eval"])
def test_pooled_buffers_carry_nothing_between_calls(eval_after):
    """The kernels' per-thread buffers are pooled between calls (Buf in dw_block_buffers.h). On one
    thread (one pool, every buffer reused) a call that leaves NaN in all of them comes before
    calls with other planes, kernel sizes, layouts and channel counts (partial 8-channel
    blocks included): each must still match the reference, and give the same bits after
    another poisoning call."""
    threads = torch.get_num_threads()

    def poison():
        args = list(args_for((2, 72, 16, 16), 9, torch.float32, "channels_last", True, True))
        args[0] = torch.full_like(args[0], float("nan"))
        _run_fwd_bwd(tuple(args))

    try:
        torch.set_num_threads(1)
        for shape, k, layout in [((2, 64, 13, 11), 3, "channels_last"), ((1, 44, 20, 7), 5, "channels_last"),
                                 ((2, 19, 9, 13), 7, "nchw")]:
            args = args_for(shape, k, torch.float32, layout, not eval_after, True)
            poison()
            fwd, bwd, bargs = _run_fwd_bwd(args)
            for name, g, w in zip(("out", "mean", "var", "preact"), fwd, reference.forward(DW_BLOCK, *args)):
                close(name, g, w, torch.float32)
            for name, g, w in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"), bwd,
                                  reference.backward(DW_BLOCK, *bargs)):
                close(name, g, w, torch.float32)
            poison()
            again = CPU.block_forward(SPECS["dw_block"], *args) + CPU.block_backward(SPECS["dw_block"], *bargs)
            for a, b in zip(fwd + bwd, again):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def test_rejects_what_it_cannot_run():
    args = args_for((2, 3, 5, 5), 3, torch.float32, "nchw", True, False)
    with pytest.raises(RuntimeError, match="float64 runs on the reference backend"):
        torch.ops.convmixer_kernels.dw_block_forward_kernel(args[0].double(), args[1].double(), *args[2:])
    with pytest.raises(ValueError, match="activation"):
        torch.ops.convmixer_kernels.dw_block_forward_kernel(*args[:9], "swish", False)


@pytest.mark.parametrize("k", [3, 9, 11])
@pytest.mark.parametrize("shape", [(2, 16, 9, 13), (1, 8, 32, 32), (2, 19, 5, 1)], ids=str)
def test_avx2_and_avx512_paths_agree(monkeypatch, shape, k):
    """CONVMIXER_KERNELS_CPU_ISA=avx2 forces the AVX2 code where the CPU has AVX-512 (the
    default there): forward (eval and train) and backward give the same bits either way,
    except the weight gradient (its sums run over pixel pairs in the AVX-512 code), so the
    reference comparisons above cover both paths."""
    results = []
    for isa in (None, "avx2"):
        if isa is None:
            monkeypatch.delenv("CONVMIXER_KERNELS_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("CONVMIXER_KERNELS_CPU_ISA", isa)
        torch.manual_seed(0)
        got = []
        for training in (False, True):
            args = args_for(shape, k, torch.float32, "nchw", training, False)
            fwd = CPU.block_forward(SPECS["dw_block"], *args)
            bargs = (torch.randn_like(fwd[0]), *args[:4], fwd[1], fwd[2], fwd[3], training, 1e-5, "gelu",
                     [True] * 5)
            got += list(fwd) + list(CPU.block_backward(SPECS["dw_block"], *bargs))
        results.append(got)
    names = ("out", "mean", "var", "preact", "dx", "dweight", "dbias", "dbn_weight", "dbn_bias") * 2
    for name, a, b in zip(names, *results):
        if name == "dweight":
            close(name, a, b, torch.float32)  # float32 sums in another order
        else:
            assert torch.equal(a, b), name


def test_plane_too_large_for_the_tile_buffers_is_refused_by_name():
    """A plane whose per-thread float32 buffer would exceed 1 GiB: a ValueError naming x and
    the way out, not std::bad_alloc."""
    x = torch.empty(1, 1, 6000, 6000).uniform_()
    w = torch.randn(1, 1, 3, 3)
    rm, rv = torch.zeros(1), torch.ones(1)
    with pytest.raises(ValueError, match=r"x: planes of 6000x6000 .*backend='reference'"):
        ck.dw_block(x, w, running_mean=rm, running_var=rv, backend="cpu")
