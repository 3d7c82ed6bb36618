"""A real training run: a small ConvMixer on scikit-learn's handwritten digits, trained
with the fused modules (backend ``cpu``) and with the reference modules from the same
seed (``convmixer_kernels/examples/train_digits.py``). The loss curves agree step by step
(the first step to float32 rounding; later steps within a tolerance that allows that
rounding to grow through 176 SGD updates) and the test accuracies are equal and far
above chance (0.1)."""
from __future__ import annotations

import torch

from convmixer_kernels.examples import train_digits


def test_fused_and_reference_training_agree():
    data = train_digits.load_data(seed=0)
    assert data[0].shape == (1437, 1, 16, 16) and data[2].shape == (360, 1, 16, 16)
    fused = train_digits.train("cpu", epochs=4, seed=0, data=data)
    ref = train_digits.train("reference", epochs=4, seed=0, data=data)
    got, want = torch.tensor(fused.losses), torch.tensor(ref.losses)
    assert len(got) == len(want) == 4 * (1437 // 32)
    print(f"largest loss difference {(got - want).abs().max().item():.3e}; accuracy "
          f"{fused.test_accuracy:.4f} vs {ref.test_accuracy:.4f}")
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-4)
    assert want[-10:].mean() < 0.5 * want[:10].mean(), "the reference run did not learn"
    assert fused.test_accuracy == ref.test_accuracy
    assert fused.test_accuracy > 0.8
