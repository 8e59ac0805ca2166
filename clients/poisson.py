"""Opacus' Poisson-sampling loader, without the batch it keeps for no reason.

Opacus 1.6's ``DPDataLoader`` collates through ``CollateFnWithEmpty``, which keeps
a deep copy of the first non-empty batch for the whole round, only to learn the
structure an empty Poisson batch must have. That is one batch of memory (for
224x224 colour images at batch 128, 77 MB) held for nothing.
:func:`hold_no_batch` makes the loader keep an empty batch of the same
structure instead: what Opacus builds from its copy anyway.
"""

from __future__ import annotations

from typing import Any

from opacus.data_loader import CollateFnWithEmpty
from torch.utils.data import DataLoader

__all__ = ["hold_no_batch"]


class _EmptyTemplateCollate(CollateFnWithEmpty):
    """``CollateFnWithEmpty`` whose template is an empty batch, not a copy of a full one."""

    first_batch: Any  # Opacus sets it in __init__; mypy cannot see its type

    def __call__(self, batch: list[Any]) -> Any:
        if self.first_batch is None and len(batch) > 0:
            output = self.wrapped_collator_fn(batch) if self.wrapped_collator_fn else batch
            # Opacus' _make_empty_batch of its copy: the same structure, batch length 0
            # (1 with rand_on_empty); a template of it gives the same again.
            self.first_batch = self._make_empty_batch(output)
            return output
        return super().__call__(batch)


def hold_no_batch(loader: DataLoader) -> DataLoader:
    """Make an Opacus Poisson loader keep no batch between steps; return it.

    Changes ``loader.collate_fn`` in place (its class, not its settings) when it is
    Opacus' ``CollateFnWithEmpty`` exactly; any other loader is returned as it is.
    Batches, empty ones included, come out as before.
    """
    if type(loader.collate_fn) is CollateFnWithEmpty:
        loader.collate_fn.__class__ = _EmptyTemplateCollate
    return loader
