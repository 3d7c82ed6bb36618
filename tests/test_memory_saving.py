"""The memory-saving training mode: backward recomputes the pre-activation from the
saved block input instead of saving it. Gradients and running statistics must be the
same bits as the default mode's, and autograd must hold one activation-sized tensor
less per block (measured with ``saved_tensors_hooks``)."""
from __future__ import annotations

import copy

import pytest
import torch

import convmixer_kernels as ck

from conftest import backends_under_test, randomize_

CASES = {  # op -> (module factory, input shape)
    "dw_block": (lambda b: ck.DepthwiseBlock(8, 5, backend=None if b == "auto" else b), (2, 8, 6, 6)),
    "pw_block": (lambda b: ck.PointwiseBlock(8, 12, backend=None if b == "auto" else b), (2, 8, 5, 5)),
    "patch_embed": (lambda b: ck.PatchEmbed(3, 8, 2, backend=None if b == "auto" else b), (2, 3, 8, 8)),
}


def _saved_bytes_and_grads(module, x, grad_seed: int):
    """(bytes autograd saved during the forward, output, input grad, parameter grads)."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.numel() else 0)
        return t

    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(g)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return sum(saved), out.detach(), grads


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_saving_gives_the_same_gradients_and_saves_less(op, dtype):
    factory, shape = CASES[op]
    for backend in backends_under_test("cpu", op, dtype) + ["auto"]:
        if backend == "native":  # the stock path: no memory-saving mode (auto then runs our ops)
            continue
        base = randomize_(factory(backend)).to(dtype).train()
        lean = ck.set_memory_saving(copy.deepcopy(base))
        if backend == "auto":  # auto with memory saving runs the first kernel backend
            kernel = ck.backends.first_kernel(op, torch.empty(shape, dtype=dtype))
            ck.set_backend(base, kernel)
        assert all(m.memory_saving for m in lean.modules() if isinstance(m, ck.modules.FusedOptions))
        x = torch.randn(shape).to(dtype)
        b_bytes, b_out, b_grads = _saved_bytes_and_grads(base, x, 1)
        l_bytes, l_out, l_grads = _saved_bytes_and_grads(lean, x, 1)
        assert torch.equal(b_out, l_out), backend
        for i, (a, b) in enumerate(zip(b_grads, l_grads)):
            assert torch.equal(a, b), f"{backend}: gradient {i} differs with memory_saving"
        assert torch.equal(base.state_dict()[next(k for k in base.state_dict() if "running_var" in k)],
                           lean.state_dict()[next(k for k in lean.state_dict() if "running_var" in k)])
        preact_bytes = b_out.numel() * torch.empty((), dtype=dtype).element_size()
        print(f"{op} {dtype} {backend}: saved {b_bytes} -> {l_bytes} bytes")
        assert b_bytes - l_bytes == preact_bytes, backend


def test_memory_saving_on_a_model_halves_the_activation_memory():
    """A ConvMixer saves per layer its two block inputs (and, by default, the two
    pre-activations): the memory-saving mode keeps only the inputs."""
    model = randomize_(ck.ConvMixer(16, 3, 3, 2, num_classes=5, backend="reference")).train()
    lean = ck.set_memory_saving(copy.deepcopy(model))
    x = torch.randn(2, 3, 16, 16)
    full, _, g_full = _saved_bytes_and_grads(model, x, 2)
    half, _, g_half = _saved_bytes_and_grads(lean, x, 2)
    for a, b in zip(g_full, g_half):
        assert torch.equal(a, b)
    act = 2 * 16 * 8 * 8 * 4  # one float32 activation of the trunk
    assert full - half == (1 + 2 * 3) * act  # the stem's pre-activation + two per layer
    ck.set_memory_saving(lean, False)
    assert not any(m.memory_saving for m in lean.modules() if isinstance(m, ck.modules.FusedOptions))
