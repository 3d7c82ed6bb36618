"""Triton depthwise-block kernels beyond the shared grid: the paths the grid does not
reach (int64 offsets, pre-activation recomputed in backward, partial output masks)
and bitwise run-to-run reproducibility. Under TRITON_INTERPRET=1 without a GPU."""
from __future__ import annotations

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import reference
from convmixer_kernels.spec import DW_BLOCK

from conftest import assert_close_to_oracle, has_cuda

DEVICE = "cuda" if has_cuda() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in ck.available_backends(DEVICE),
                                reason="the triton backend cannot run here")


def _args(n=2, c=5, h=9, w=7, k=5, dtype=torch.float32, layout=torch.contiguous_format):
    x = torch.randn(n, c, h, w, device=DEVICE).to(dtype).contiguous(memory_format=layout)
    wt = (torch.randn(c, 1, k, k, device=DEVICE) * 0.3).to(dtype)
    b, bnw, bnb = (torch.randn(c, device=DEVICE).to(dtype) for _ in range(3))
    rm, rv = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
    return x, wt, b, bnw, bnb, rm, rv


def _fwd(args, training, save, act="gelu"):
    return ck.backends.get("triton").block_forward(DW_BLOCK, *args, training, 1e-5, act, save, None)


def _bwd(g, args, stats, training, preact, mask, act="gelu"):
    x, wt, b, bnw = args[:4]
    return ck.backends.get("triton").block_backward(DW_BLOCK, g, x, wt, b, bnw, stats[0], stats[1],
                                                    preact, training, 1e-5, act, mask)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_is_bitwise_reproducible(training):
    args = _args(n=3, c=6, h=11, w=10, k=7)
    out, mean, var, pre = _fwd(args, training, True)
    g = torch.randn_like(out)
    first = _bwd(g, args, (mean, var), training, pre, [True] * 5)
    for _ in range(2):
        again = _bwd(g, args, (mean, var), training, pre, [True] * 5)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    assert torch.equal(_fwd(args, training, False)[0], out)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_recomputed_preact_gives_the_saved_preact_gradients(training):
    """Backward without the saved pre-activation recomputes it from x: same results."""
    args = _args(layout=torch.channels_last)
    out, mean, var, pre = _fwd(args, training, True)
    assert pre.shape == out.shape
    assert _fwd(args, training, False)[3].numel() == 0
    g = torch.randn_like(out)
    saved = _bwd(g, args, (mean, var), training, pre, [True] * 5)
    recomputed = _bwd(g, args, (mean, var), training, pre.new_empty(0), [True] * 5)
    for a, b in zip(saved, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mask", [[True, False, False, False, False],
                                  [False, True, True, False, False],
                                  [False, False, False, True, True],
                                  [False, False, True, False, True]], ids=str)
def test_partial_output_masks(mask):
    args = _args()
    out, mean, var, pre = _fwd(args, True, True)
    g = torch.randn_like(out)
    got = _bwd(g, args, (mean, var), True, pre, mask)
    ref_out = reference.forward(DW_BLOCK, *args, True, 1e-5, "gelu", True)
    want = reference.backward(DW_BLOCK, g, *args[:4], ref_out[1], ref_out[2], ref_out[3], True,
                              1e-5, "gelu", mask)
    assert len({id(t) for t in got}) == len(got), "results must be distinct tensors"
    for asked, a, b in zip(mask, got, want):
        if asked:
            assert_close_to_oracle("grad", a, b)
        else:
            assert a.numel() == 0


def test_int64_offsets_path_matches(monkeypatch):
    """The int64-offset variant (taken when a tensor has 2**31 or more elements) computes
    the same results as the int32 one, forced here on a small input."""
    from convmixer_kernels.backends.triton import dw_block

    args = _args(layout=torch.channels_last)
    ref = _fwd(args, True, True)
    g = torch.randn_like(ref[0])
    ref_b = _bwd(g, args, ref[1:3], True, ref[3], [True] * 5)
    monkeypatch.setattr(dw_block, "needs_int64", lambda *t: True)
    got = _fwd(args, True, True)
    got_b = _bwd(g, args, got[1:3], True, got[3], [True] * 5)
    for a, b in zip(got + got_b, ref + ref_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_nan_and_inf_propagate_as_in_the_reference(act):
    args = list(_args())
    x = args[0].clone()
    x[0, 1, 2, 3], x[1, 2, 4, 4] = float("nan"), float("inf")
    args[0] = x
    got = _fwd(args, False, False, act)[0]
    want = reference.forward(DW_BLOCK, *[a.double() for a in args], False, 1e-5, act, False)[0]
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
