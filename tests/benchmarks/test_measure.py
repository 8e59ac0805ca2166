"""The benchmarks' tensor-memory peak, against sizes worked out by hand."""

import torch

from simulations.benchmarks.measure import tensor_peak_bytes

MB4 = 1000 * 1000 * 4  # a 1000 x 1000 float32 tensor


def test_tensor_peak_counts_transients_and_frees_in_order():
    kept = []

    def run():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB
        del a  # 4 MB
        # (b + 1) is a 4 MB temporary that lives only inside this line: 8 MB again.
        kept.append((b + 1).sum())
        del b

    # Execute
    peak = tensor_peak_bytes(run)
    # Assert: two 4 MB tensors at once, never three; the scalars are a few bytes.
    assert 2 * MB4 <= peak < 2 * MB4 + 1024


def test_tensors_alive_before_the_run_do_not_count():
    before = torch.ones(1000, 1000)

    def run():
        before.mul_(2)  # in place: no new memory
        return torch.zeros(250, 1000)  # 1 MB, freed when the result is dropped

    # Execute
    peak = tensor_peak_bytes(run)
    # Assert
    assert MB4 // 4 <= peak < MB4 // 4 + 1024
