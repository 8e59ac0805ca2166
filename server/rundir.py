"""The run directory: the files later tools and users rely on.

| file | content |
| --- | --- |
| ``config.yaml`` | the resolved configuration |
| ``metrics.jsonl`` | one JSON object per round |
| ``summary.json`` | the run's headline numbers |
| ``model.safetensors`` | the final global model |
| ``ledger.sqlite`` | the server's privacy ledger (``privacy.ledger``) |
| ``partition_report.json/.png`` | bundled data: each simulated client's counts and class mix |
| ``sites/NAME/`` | in simulation, each site's state folder (its own ledger) |
| ``fedpriv.log`` | Flower's and Ray's log output |
| ``tensorboard/`` | optional event files |
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunDir"]


def _jsonable(value: Any) -> Any:
    """NaN and infinities become ``null`` so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunDir:
    def __init__(self, path: str | os.PathLike[str], tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / "tensorboard"))

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.sqlite"

    @property
    def sites_dir(self) -> Path:
        return self.path / "sites"

    def write_config(self, resolved_yaml: str) -> None:
        (self.path / "config.yaml").write_text(resolved_yaml)

    def append_round(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._tb is not None:
            r = record["round"]
            for key, value in record["central"].items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(f"central/{key}", value, r)
            for c in record["clients"]:
                self._tb.add_scalar(f"epsilon/client_{c['client']}", c["epsilon"], r)
            self._tb.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.path / "summary.json.tmp"
        tmp.write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
        tmp.replace(self.path / "summary.json")

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(self.path / "model.safetensors"))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
