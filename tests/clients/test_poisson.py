"""Opacus' Poisson loader with hold_no_batch: the same batches, no batch kept."""

import torch
from opacus.data_loader import CollateFnWithEmpty, DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from clients.poisson import hold_no_batch

N_RECORDS = 64


def _poisson_loader(seed):
    data = TensorDataset(torch.arange(N_RECORDS * 3, dtype=torch.float32).reshape(N_RECORDS, 3),
                         torch.arange(N_RECORDS))
    # Expected batch 1 of 64 records: about a third of the batches are empty.
    plain = DataLoader(data, batch_size=1)
    return DPDataLoader.from_data_loader(plain, generator=torch.Generator().manual_seed(seed))


def test_batches_empty_ones_included_are_opacus_own():
    # Prepare
    opacus_own, lean = _poisson_loader(3), hold_no_batch(_poisson_loader(3))
    # Execute
    expected, got = list(opacus_own), list(lean)
    # Assert
    assert any(len(y) == 0 for _, y in expected) and any(len(y) > 1 for _, y in expected)
    assert len(got) == len(expected)
    for (x0, y0), (x1, y1) in zip(expected, got, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert x0.shape == x1.shape and x0.dtype == x1.dtype and y0.dtype == y1.dtype


def test_the_loader_keeps_an_empty_template_not_a_batch():
    # Prepare
    opacus_own, lean = _poisson_loader(5), hold_no_batch(_poisson_loader(5))
    # Execute
    list(opacus_own), list(lean)
    # Assert: Opacus keeps a copy of its first non-empty batch; ours keeps no record.
    assert len(opacus_own.collate_fn.first_batch[1]) > 0
    x, y = lean.collate_fn.first_batch
    assert x.shape == (0, 3) and y.shape == (0,) and y.dtype == torch.int64
    assert isinstance(lean.collate_fn, CollateFnWithEmpty)


def test_other_loaders_are_left_alone():
    # Prepare
    loader = DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2)
    collate = loader.collate_fn
    # Execute / Assert
    assert hold_no_batch(loader) is loader and loader.collate_fn is collate
