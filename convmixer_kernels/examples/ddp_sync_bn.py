"""Data-parallel training with synchronized BatchNorm: a small ConvMixer in
``DistributedDataParallel`` on CPU processes (gloo), its BatchNorms synchronized by
``convmixer_kernels.convert_sync_batchnorm``.

Every rank builds the same model (same seed), takes its slice of one global batch
per step, and saves what it saw (outputs, input gradients, DDP-averaged parameter
gradients, running statistics) so that a test can compare them with one process
training on the whole batch (``tests/test_sync_bn.py``)::

    python -m convmixer_kernels.examples.ddp_sync_bn --world 2 --backend cpu

``nn.SyncBatchNorm`` itself accepts only GPU tensors (torch 2.11), so on CPU the
definition it implements is the yardstick: BatchNorm over the global batch, input
gradients of the sum of every rank's loss, parameter gradients averaged by DDP.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import convmixer_kernels as ck

DIM, DEPTH, KERNEL, PATCH, CLASSES, IMAGE = 8, 2, 3, 2, 4, 8


def make_model(backend: str, activation: str, seed: int = 0) -> ck.ConvMixer:
    """The model every rank (and the single-process oracle) starts from."""
    torch.manual_seed(seed)
    model = ck.ConvMixer(DIM, DEPTH, KERNEL, PATCH, num_classes=CLASSES, activation=activation,
                         backend=backend)
    with torch.no_grad():  # non-default BN parameters and biases
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, torch.nn.Conv2d):
                m.bias.uniform_(-0.5, 0.5)
    return model


def global_batches(steps: int, batch: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, IMAGE, IMAGE, generator=g),
             torch.randint(0, CLASSES, (batch,), generator=g)) for _ in range(steps)]


def bounds(local_batches: Sequence[int], rank: int) -> tuple[int, int]:
    lo = sum(local_batches[:rank])
    return lo, lo + local_batches[rank]


def run_rank(rank: int, world: int, init_file: str, out_dir: str, backend: str, activation: str,
             local_batches: Sequence[int], steps: int) -> None:
    """One rank: DDP training steps (SGD, summed cross-entropy); saves ``rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = ck.convert_sync_batchnorm(make_model(backend, activation))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        lo, hi = bounds(local_batches, rank)
        record: dict[str, list] = {"out": [], "x_grad": [], "grads": []}
        for x_all, y_all in global_batches(steps, sum(local_batches)):
            x = x_all[lo:hi].clone().requires_grad_()
            out = ddp(x)
            F.cross_entropy(out, y_all[lo:hi], reduction="sum").backward()
            record["out"].append(out.detach())
            record["x_grad"].append(x.grad)
            record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad(set_to_none=True)
        record["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(world: int, backend: str, activation: str, local_batches: Sequence[int], steps: int,
           out_dir: str) -> list[dict]:
    """Run ``world`` ranks as processes; return each rank's record."""
    if len(local_batches) != world:
        raise ValueError(f"local_batches: expected {world} sizes, got {list(local_batches)}")
    fd, init_file = tempfile.mkstemp(prefix="ck_gloo_", dir=out_dir)
    os.close(fd)
    os.remove(init_file)  # the file store creates it
    mp.spawn(run_rank, args=(world, init_file, out_dir, backend, activation, list(local_batches), steps),
             nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--activation", default="gelu")
    ap.add_argument("--local-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = launch(args.world, args.backend, args.activation, [args.local_batch] * args.world,
                         args.steps, tmp)
    for r, rec in enumerate(records):
        mean = rec["state"]["blocks.0.3.running_mean"]
        print(f"rank {r}: layer 0 pointwise BN running_mean[:4] = {mean[:4].tolist()}")


if __name__ == "__main__":
    main()
