"""Synchronized BatchNorm (issue: distributed training): the fused modules inside
DistributedDataParallel on 2 CPU processes (gloo) against one process training on the
global batch.

``nn.SyncBatchNorm`` refuses CPU tensors, so the yardstick is what it defines: every
rank's output is BatchNorm over the global batch, its input gradient is that of the
sum of all ranks' losses, the (DDP-averaged) parameter gradients are those of the
summed loss divided by the world size, and the running statistics move with the
global mean and unbiased variance. The single-process oracle runs the reference
blocks in float64; the same run in float32 measures PyTorch's own rounding (the
docs/design.md (The tolerance rule) rule of ``assert_close_to_oracle``).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convmixer_kernels as ck
from convmixer_kernels.examples import ddp_sync_bn as ex

from conftest import assert_close_to_oracle

STEPS = 2


def _oracle(activation: str, local_batches: list[int], dtype: torch.dtype) -> dict:
    """One process, the whole batch, reference blocks, plain BatchNorm; the loss is the sum
    of the ranks' losses over the world size (what DDP's averaged gradients descend)."""
    world = len(local_batches)
    model = ex.make_model("reference", activation).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    record: dict = {"out": [], "x_grad": [], "grads": []}
    for x, y in ex.global_batches(STEPS, sum(local_batches)):
        x = x.to(dtype).requires_grad_()
        out = model(x)
        (F.cross_entropy(out, y, reduction="sum") / world).backward()
        record["out"].append(out.detach())
        record["x_grad"].append(x.grad * world)
        record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    record["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return record


def _check(records: list[dict], local_batches: list[int], activation: str) -> None:
    truth = _oracle(activation, local_batches, torch.float64)
    noise = _oracle(activation, local_batches, torch.float32)
    for rank, rec in enumerate(records):
        lo, hi = ex.bounds(local_batches, rank)
        for s in range(STEPS):
            if hi > lo:
                assert_close_to_oracle(f"rank{rank} step{s} out", rec["out"][s],
                                       truth["out"][s][lo:hi], noise["out"][s][lo:hi])
                assert_close_to_oracle(f"rank{rank} step{s} x.grad", rec["x_grad"][s],
                                       truth["x_grad"][s][lo:hi], noise["x_grad"][s][lo:hi])
            else:
                assert rec["out"][s].shape[0] == 0
            for name, g in rec["grads"][s].items():
                torch.testing.assert_close(g, records[0]["grads"][s][name], rtol=0, atol=0)
                assert_close_to_oracle(f"rank{rank} step{s} grad {name}", g, truth["grads"][s][name],
                                       noise["grads"][s][name])
        for key, value in rec["state"].items():
            if value.is_floating_point():
                assert_close_to_oracle(f"rank{rank} {key}", value, truth["state"][key],
                                       noise["state"][key])
            else:
                assert torch.equal(value, truth["state"][key]), key


@pytest.mark.parametrize("backend,activation,local_batches", [
    ("cpu", "gelu", [3, 3]),
    ("reference", "relu", [2, 4]),
    ("cpu", "gelu_tanh", [5, 0]),  # an empty rank takes part in every collective
])
def test_ddp_sync_bn_matches_global_batch(tmp_path, backend, activation, local_batches):
    if backend not in ck.available_backends("cpu", "dw_block", torch.float32):
        pytest.fail(f"backend {backend} is not available in this build")
    records = ex.launch(len(local_batches), backend, activation, local_batches, STEPS, str(tmp_path))
    _check(records, local_batches, activation)


def test_sync_without_process_group_is_plain_batchnorm():
    """Not initialized (or one rank): a synchronized block is a plain one, bit for bit."""
    plain = ck.ConvMixerLayer(8, 3, backend="cpu").train()
    synced = ck.convert_sync_batchnorm(copy.deepcopy(plain))
    assert synced[0].sync_bn and synced.sync_bn
    x = torch.randn(2, 8, 5, 5)
    outs = []
    for m in (plain, synced):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(torch.ones_like(out))
        outs.append((out, xi.grad, m[3].running_var.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_convert_sync_batchnorm_keeps_keys_and_converts_other_batchnorms():
    model = nn.Sequential(ck.PointwiseBlock(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    keys = list(model.state_dict())
    group = object()  # any process-group handle is kept as given
    out = ck.convert_sync_batchnorm(model, process_group=group)
    assert out is model and list(model.state_dict()) == keys
    assert model[0].sync_bn and model[0].process_group is group
    assert type(model[0][2]) is nn.BatchNorm2d  # the fused module's own BN stays stock
    assert isinstance(model[2], nn.SyncBatchNorm) and model[2].process_group is group


@pytest.mark.parametrize("arg,value", [("sync_bn", 1), ("memory_saving", "yes")])
def test_bad_option_names_the_argument(arg, value):
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)
    with pytest.raises(TypeError, match=arg):
        ck.dw_block(x, w, training=True, **{arg: value})
    with pytest.raises(TypeError, match="module"):
        ck.convert_sync_batchnorm("not a module")
