"""With ``torch.use_deterministic_algorithms(True)`` every backward of ours is bitwise
reproducible run to run: each available backend, each op, train and eval, three runs
from the same parameters, input and output gradient give identical outputs, gradients
and running statistics. A GPU variant is marked ``cuda`` (skipped without one)."""
from __future__ import annotations

import copy

import pytest
import torch

import convmixer_kernels as ck

from conftest import backends_under_test, grads_of, has_cuda, randomize_

OPS = ("dw_block", "pw_block", "patch_embed")


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def build(op: str, big: bool) -> tuple[torch.nn.Module, tuple[int, ...]]:
    # Large enough on the compiled paths for several threads/blocks to share each reduction;
    # small for the Triton interpreter.
    n, c, h, w = (4, 24, 30, 29) if big else (2, 5, 9, 7)
    if op == "dw_block":
        return ck.DepthwiseBlock(c, 5), (n, c, h, w)
    if op == "pw_block":
        return ck.PointwiseBlock(c, c + 3), (n, c, h, w)
    return ck.PatchEmbed(3, c, 3), (n, 3, h, w)


def run_three_times(op: str, backend: str, training: bool, device: str) -> None:
    module, shape = build(op, big=backend != "triton" or device != "cpu")
    module = randomize_(module).train(training)
    x0 = torch.randn(shape).to(device).contiguous(memory_format=torch.channels_last)
    results = []
    for _ in range(3):
        m = copy.deepcopy(module).to(device)
        m.backend = backend
        x = x0.clone().requires_grad_()
        out = m(x)
        out.backward(torch.ones_like(out).mul_(torch.arange(out.shape[1], device=device)
                                                .view(1, -1, 1, 1) - 2.5))
        grads = grads_of(m, x)
        assert all(g is not None for g in grads.values())
        results.append((out.detach(), grads, dict(m.named_buffers())))
    first_out, first_grads, first_bufs = results[0]
    for i, (out, grads, bufs) in enumerate(results[1:], 2):
        assert torch.equal(out, first_out), f"run {i}: output differs from run 1"
        for name in first_grads:
            assert torch.equal(grads[name], first_grads[name]), f"run {i}: grad {name} differs"
        for name in first_bufs:
            assert torch.equal(bufs[name], first_bufs[name]), f"run {i}: buffer {name} differs"


CPU_CASES = [(op, b) for op in OPS for b in backends_under_test("cpu", op)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op,backend", CPU_CASES)
def test_cpu_backward_bitwise_reproducible(op, backend, training, deterministic):
    run_three_times(op, backend, training, "cpu")


CUDA_CASES = ([(op, b) for op in OPS for b in backends_under_test("cuda", op)]
              if has_cuda() else [("dw_block", "none")])


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op,backend", CUDA_CASES)
def test_cuda_backward_bitwise_reproducible(op, backend, training, deterministic):
    run_three_times(op, backend, training, "cuda")
