"""The C++ CPU kernels of pw_block and patch_embed (csrc/cpu/gemm_blocks.cpp) against
``convmixer_kernels.reference.forward/backward``, called directly with the backend
contract's arguments.

Grid: op x dtype x layout x train/eval, each running a few odd shapes (C in {1, 3, 17,
64}, non-square H, W in {1, 7, 13}, patch sizes 1, 2, 4, 7, Cout != Cin) with the
activation, save_preact and the presence of bias / BatchNorm parameters varying across
shapes, and several output masks in backward. Tolerances: float64 1e-10 of the output
scale; float32 1e-5 of the scale; float16/bfloat16 a few units in the last place at the
scale. Both sides round the same pre-activation but accumulate the GEMM in a different
order, and BatchNorm amplifies that by 1/std, so each bound also allows twice the
reference's own error against a float64 run of the same maths.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from unittest import mock

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import _cpp_lib, backends, reference
from convmixer_kernels._activations import ACTIVATIONS
from convmixer_kernels.spec import (SPECS, out_format_name, out_memory_format,
                                     output_memory_format, stats_dtype)

_reason = _cpp_lib.status()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"compiled extension unavailable: {_reason}")

OPS = ("pw_block", "patch_embed")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("nchw", "channels_last", "strided")
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
MASKS = ([True] * 5, [True, False, True, False, True], [False, True, False, True, False],
         [False, False, False, True, True], [False] * 5)

# (N, Cin, H, W, Cout, p)
SHAPES = {
    "pw_block": [(2, 3, 7, 13, 17, 1), (3, 1, 13, 7, 3, 1), (2, 17, 1, 1, 64, 1),
                 (1, 64, 7, 7, 1, 1), (2, 17, 13, 1, 5, 1)],
    "patch_embed": [(2, 3, 13, 7, 8, 2), (1, 1, 13, 13, 3, 4), (2, 3, 7, 13, 17, 7),
                    (2, 17, 7, 13, 5, 1), (3, 3, 13, 13, 64, 4)],
}
# Multi-chunk paths of the fused passes (many rows of channels; NCHW planes split in blocks).
BIG_SHAPES = {"pw_block": (1, 3, 64, 72, 5, 1), "patch_embed": (1, 1, 131, 130, 3, 2)}


def make_input(shape, dtype, layout):
    n, c, h, w = shape
    if layout == "strided":
        return torch.randn(n, c, h, 2 * w + 1, dtype=torch.float64).to(dtype)[..., 1::2]
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def make_args(shape, dtype, layout, training, case):
    n, cin, h, w, cout, p = shape
    act = ACTIVATIONS[case % len(ACTIVATIONS)]
    with_bias, with_bnw, with_bnb = case % 2 == 0, case % 3 != 1, case % 4 != 3
    x = make_input((n, cin, h, w), dtype, layout)
    weight = (torch.randn(cout, cin, p, p, dtype=torch.float64) / (cin * p * p) ** 0.5).to(dtype)
    bias = (0.5 * torch.randn(cout, dtype=torch.float64)).to(dtype) if with_bias else None
    bn_w = torch.rand(cout) + 0.5 if with_bnw else None
    bn_b = torch.randn(cout) if with_bnb else None
    rm, rv = 0.3 * torch.randn(cout), torch.rand(cout) + 0.5
    if training and case % 2:
        rm = rv = None
    return [x, weight, bias, bn_w, bn_b, rm, rv, training, 1e-5, act]


@contextlib.contextmanager
def no_onednn():
    """The reference's convolutions without oneDNN: its primitive creation for every new
    tiny shape would dominate this file's run time (same maths, float32 accumulation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def ref_forward(op, args):
    with no_onednn():
        return reference.forward(SPECS[op], *args)


def ref_backward(op, args):
    with no_onednn():
        return reference.backward(SPECS[op], *args)


def to64(args):
    return [a.double() if isinstance(a, torch.Tensor) else a for a in args]


def check(name, got, want, want64, dtype):
    """got (kernel) vs want (reference in the same dtype, from the same pre-activation);
    want64: the reference's maths in float64 from that pre-activation.

    Bound: tol * scale plus twice the reference's own rounding error (want vs want64),
    which is large only where BatchNorm amplifies rounding (a channel of near-constant
    values). got must be that close to the reference, or at least that close to float64
    (as accurate as the reference, only rounded differently)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    if got.numel() == 0:
        return
    got, want, want64 = got.double(), want.double(), want64.double()
    scale = max(want.abs().max().item(), 1.0)
    err = (got - want).abs().max().item()
    ref_err = (want - want64).abs().max().item()
    tol = RTOL[dtype] if dtype in RTOL else 4 * ULP[dtype]
    bound = tol * scale + 2 * ref_err
    err64 = (got - want64).abs().max().item()
    assert err <= bound or err64 <= bound, (
        f"{name}: max error {err:.3e} (vs float64: {err64:.3e}) > bound {bound:.3e} "
        f"(scale {scale:.3e}, reference's error {ref_err:.3e})")
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern differs"


def check_fresh(outputs, inputs):
    """No result aliases an input or another result; empty placeholders are distinct."""
    for i, a in enumerate(outputs):
        for b in outputs[i + 1:]:
            assert a is not b
            if a.numel() and b.numel():
                assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        for t in inputs:
            if isinstance(t, torch.Tensor) and a.numel() and t.numel():
                assert a.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def ref_forward_from(op, args, z):
    """reference.forward with its pre-activation replaced by z (the kernel's): the two
    GEMMs accumulate in different orders, and BatchNorm over a few values can amplify a
    one-ulp difference of z well beyond the tolerance of everything downstream."""
    with mock.patch.object(reference, "_preact", lambda *_: z):
        return ref_forward(op, args)


def run_case(op, shape, dtype, layout, training, case, save_preact, masks=MASKS):
    cpu = backends.get("cpu")
    args = make_args(shape, dtype, layout, training, case)
    x, weight, bias, bn_w = args[:4]
    # the output layout the kernel is asked for: x's own or the other one, varying with
    # the case, the layout and the mode (tests/test_output_layout.py crosses them all)
    out_format = ("channels_last", "contiguous")[(case + LAYOUTS.index(layout) + training) % 2]
    fmt, in_fmt = out_memory_format(out_format), output_memory_format(x)
    got = cpu.block_forward(SPECS[op], *args, save_preact, out_format)
    z = got[3] if save_preact else cpu.block_forward(SPECS[op], *args, True, out_format)[3]

    # The GEMM: the kernel's pre-activation against the reference's.
    want_z, want_z64 = ref_forward(op, args + [True])[3], ref_forward(op, to64(args) + [True])[3]
    check("preact", z, want_z, want_z64, dtype)
    if not save_preact:
        assert got[3].numel() == 0 and got[3].dtype == dtype
    # Everything after the GEMM, from the same pre-activation.
    want = ref_forward_from(op, args + [save_preact, out_format], z)
    want64 = ref_forward_from(op, to64(args) + [save_preact, out_format], z.double())
    for name, g, w, w64 in zip(("out", "mean", "var"), got, want, want64):
        check(name, g, w, w64, dtype)
    assert got[0].is_contiguous(memory_format=fmt)
    assert got[1].dtype == got[2].dtype == stats_dtype(x)
    if save_preact:
        assert got[3].is_contiguous(memory_format=fmt) and got[3].dtype == dtype
    check_fresh(got, args)

    # grad_out in out's layout, as the op's autograd formula passes it: a backward that
    # recomputes z then runs the forward's GEMM (other layouts: tests/test_output_layout.py)
    grad = torch.randn(got[0].shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    for m, mask in enumerate(masks):
        mask = [mask[0], mask[1], mask[2] and bias is not None, mask[3] and bn_w is not None, mask[4]]
        # the kernel with the saved preact, or (every other mask) recomputing it from x
        preact = z if save_preact and m % 2 == 0 else x.new_empty(0)
        bwd = [grad, x, weight, bias, bn_w, got[1], got[2], preact, training, 1e-5, args[9], mask]
        got_b = cpu.block_backward(SPECS[op], *bwd)
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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_against_reference(op, dtype, layout, training):
    for case, shape in enumerate(SHAPES[op]):
        masks = [MASKS[(case + i) % len(MASKS)] for i in range(3)]
        run_case(op, shape, dtype, layout, training, case, case % 2 == 1, masks)


@pytest.mark.parametrize("training,save_preact", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("op", OPS)
def test_against_reference_multi_chunk(op, dtype, layout, training, save_preact):
    run_case(op, BIG_SHAPES[op], dtype, layout, training, 1, save_preact)


@pytest.mark.parametrize("op", OPS)
def test_every_activation_and_param_combination(op):
    shape = SHAPES[op][0]
    for act_i, case in itertools.product(range(len(ACTIVATIONS)), range(4)):
        run_case(op, shape, torch.float32, "nchw", True, case * len(ACTIVATIONS) + act_i, True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_modules_cpu_vs_reference(op, layout, training):
    torch.manual_seed(0)
    if op == "pw_block":
        fused, shape = ck.PointwiseBlock(6, 10, "gelu"), (3, 6, 9, 7)
    else:
        fused, shape = ck.PatchEmbed(3, 12, 4, "gelu_tanh"), (2, 3, 17, 13)
    with torch.no_grad():
        fused[2].weight.uniform_(0.5, 1.5)
        fused[2].bias.uniform_(-0.5, 0.5)
        fused[2].running_mean.uniform_(-0.5, 0.5)
        fused[2].running_var.uniform_(0.5, 2.0)
    ref = copy.deepcopy(fused)
    fused.backend, ref.backend = "cpu", "reference"
    fused.train(training), ref.train(training)
    x = make_input(shape, torch.float32, layout).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    out, want = fused(x), ref(x2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the modules' default: the layout torch's own convolution returns for x
    stock = torch.nn.functional.conv2d(x.detach(), fused[0].weight, stride=fused[0].stride)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert out.is_contiguous(memory_format=fmt) == stock.is_contiguous(memory_format=fmt)
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, p), (_, q) in zip(fused.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(p, q, msg=name)


def test_no_grad_forward_saves_no_preact():
    m = ck.PointwiseBlock(4, 5).train()
    m.backend = "cpu"
    with torch.no_grad():
        out = m(torch.randn(2, 4, 3, 3))
    assert out.shape == (2, 5, 3, 3)


@pytest.mark.parametrize("op", OPS)
def test_bad_input_messages(op):
    kernel = getattr(torch.ops.convmixer_kernels, f"{op}_forward_kernel")
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 2, 2)
    if op == "pw_block":  # shapes are formatted into the message (csrc/common/shape_str.h)
        with pytest.raises(RuntimeError, match=r"weight.*got \[4, 3, 2, 2\]"):
            kernel(x, w, None, None, None, None, None, True, 1e-5, "gelu", False, "contiguous")
        w = torch.randn(4, 3, 1, 1)
    with pytest.raises(RuntimeError, match="running_mean"):
        kernel(x, w, None, None, None, None, None, False, 1e-5, "gelu", False, "contiguous")
    with pytest.raises(RuntimeError, match="bias"):
        kernel(x, w, torch.randn(5), None, None, None, None, True, 1e-5, "gelu", False, "contiguous")
    with pytest.raises((RuntimeError, ValueError), match="activation"):
        kernel(x, w, None, None, None, None, None, True, 1e-5, "tanh", False, "contiguous")
    with pytest.raises(RuntimeError, match="x"):
        kernel(x[0], w, None, None, None, None, None, True, 1e-5, "gelu", False, "contiguous")
    with pytest.raises(RuntimeError, match="x"):
        kernel(x.to(torch.int32), w, None, None, None, None, None, True, 1e-5, "gelu", False, "contiguous")
    with pytest.raises(ValueError, match="out_format"):
        kernel(x, w, None, None, None, None, None, True, 1e-5, "gelu", False, "nhwc")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reductions_do_not_depend_on_thread_count(layout, training):
    """The fused passes' reductions are combined in a fixed order: bitwise-equal results
    with 1, 2 and 3 threads. (Cin=1 keeps the GEMM exact in the forward; the backward
    gets the saved preact, so dbias/dbn_* come from the fused passes alone.)"""
    cpu = backends.get("cpu")
    x1 = make_input((3, 1, 67, 71), torch.float32, "nchw")
    w1 = torch.randn(5, 1, 1, 1)
    x = make_input((3, 4, 67, 71), torch.float32, layout)
    w = torch.randn(5, 4, 1, 1)
    b, bw, bb, rm, rv = torch.randn(5), torch.rand(5) + 0.5, torch.randn(5), torch.randn(5), torch.rand(5) + 0.5
    fmt = out_format_name(output_memory_format(x))
    _, mean, var, preact = cpu.block_forward(SPECS["pw_block"], x, w, b, bw, bb, rm, rv, training, 1e-5,
                                       "gelu", True, fmt)
    grad = torch.randn(preact.shape).contiguous(memory_format=output_memory_format(x))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            fwd = cpu.block_forward(SPECS["pw_block"], x1, w1, b, bw, bb, rm, rv, training, 1e-5, "gelu", True,
                              fmt)
            bwd = cpu.block_backward(SPECS["pw_block"], grad, x, w, b, bw, mean, var, preact, training, 1e-5,
                               "gelu", [False, False, True, True, True])
            results.append((*fwd[:3], *bwd[2:]))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", OPS)
def test_convolution_path_without_onednn(op, training):
    """float32 with a channels_last output runs its GEMMs as ATen convolutions (oneDNN where
    enabled); with oneDNN turned off ATen takes its own convolution, and the kernels must still
    match the reference (both GEMM routes: channels_last and NCHW outputs, by case)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        for case, shape in enumerate(SHAPES[op][:3]):
            run_case(op, shape, torch.float32, "channels_last", training, case, case % 2 == 0,
                     [MASKS[0], MASKS[2]])
    finally:
        torch.backends.mkldnn.enabled = enabled
