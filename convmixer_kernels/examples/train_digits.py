"""Train a small ConvMixer on scikit-learn's handwritten digits, twice: with the fused
modules (backend ``cpu``) and with the reference modules (backend ``reference``).

The 8x8 digit images (``sklearn.datasets.load_digits``, 1797 of them) are scaled to
[0, 1], upsampled to 16x16 (bilinear) and split 80/20 with a fixed permutation. Both
runs start from the same seed, so they see the same initial parameters and the same
batches; the loss curves agree step by step within float32 rounding and the test
accuracies are equal (and far above the 0.1 of chance).

    python -m convmixer_kernels.examples.train_digits [--epochs 4] [--backend cpu]

Needs scikit-learn (pinned in requirements.txt).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import convmixer_kernels as ck


@dataclass
class Run:
    backend: str
    losses: list[float]
    test_accuracy: float


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): float32 images (N, 1, 16, 16) in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    train, test = perm[:n_train], perm[n_train:]
    return x[train], y[train], x[test], y[test]


def train(backend: str, epochs: int = 4, seed: int = 0, batch_size: int = 32,
          lr: float = 0.05, data=None, num_threads: Optional[int] = 1) -> Run:
    """Train ConvMixer(dim 32, depth 2, k 3, patch 2) with SGD + momentum; return the
    per-step training losses and the test accuracy. ``num_threads`` intra-op threads
    while training (one is fastest for tensors this small; None: leave as set)."""
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(backend, epochs, seed, batch_size, lr, data)
    finally:
        torch.set_num_threads(before)


def _train(backend: str, epochs: int, seed: int, batch_size: int, lr: float, data) -> Run:
    x_train, y_train, x_test, y_test = load_data(seed) if data is None else data
    torch.manual_seed(seed)
    model = ck.ConvMixer(32, 2, kernel_size=3, patch_size=2, num_classes=10, in_chans=1,
                         backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order = torch.Generator().manual_seed(seed + 1)
    losses = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=order)
        for i in range(0, len(perm) - batch_size + 1, batch_size):  # full batches only
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return Run(backend, losses, accuracy)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="cpu", help="backend of the fused run (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = parser.parse_args(argv)
    data = load_data(args.seed)
    fused = train(args.backend, args.epochs, args.seed, data=data, num_threads=args.threads)
    ref = train("reference", args.epochs, args.seed, data=data, num_threads=args.threads)
    worst = max(abs(a - b) for a, b in zip(fused.losses, ref.losses))
    every = max(1, len(fused.losses) // 10)
    print(f"{'step':>5} {args.backend + ' loss':>12} {'reference loss':>15}")
    for step in range(0, len(fused.losses), every):
        print(f"{step:5d} {fused.losses[step]:12.6f} {ref.losses[step]:15.6f}")
    print(f"steps: {len(fused.losses)}, largest loss difference: {worst:.3e}")
    print(f"test accuracy: {args.backend} {fused.test_accuracy:.4f}, "
          f"reference {ref.test_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
