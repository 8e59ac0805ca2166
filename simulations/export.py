"""``fedpriv export-sites``: write a bundled data set out as site files.

For trying the site-file path (``dataset=csv`` and friends) on data whose
bundled accuracy is known: the server's held-out split becomes ``test.EXT``,
and the rest is cut among ``--clients`` sites exactly as a simulation would
cut it, one file per site.

    fedpriv export-sites --dataset digits --format csv --clients 3 --out sites/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["main", "export_sites"]

FORMATS = ("csv", "parquet", "npz")


def _write(path: Path, x: np.ndarray, y: np.ndarray, fmt: str, pixel_scale: float) -> None:
    if fmt == "npz":
        np.savez_compressed(path, x=(x * pixel_scale).round().astype(np.uint8), y=y)
        return
    import pandas as pd

    flat = x.reshape(len(x), -1)
    frame = pd.DataFrame(flat, columns=[f"f{i}" for i in range(flat.shape[1])])
    frame["label"] = y
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def export_sites(dataset: str, fmt: str, clients: int, out: Path, seed: int = 0,
                 partitioner: str = "iid") -> list[Path]:
    """Write one file per site plus ``test.EXT``; return the site files' paths.

    Image pixels are written back in their original [0, 1] range (NPZ: 0..255
    bytes); tabular features as they are bundled.
    """
    from dataclasses import replace

    from clients.config import DatasetConfig
    from clients.data import partition_all, server_test_split

    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r}: choose one of {list(FORMATS)}")
    cfg = replace(DatasetConfig(name=dataset), partitioner=partitioner)
    pool, test = server_test_split(cfg, seed)
    image = pool.x.ndim == 4
    # Bundled images are centred to [-1, 1]; a site's export holds raw [0, 1] pixels.
    def raw(v: np.ndarray) -> np.ndarray:
        return (v + 1.0) / 2.0 if image else v

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(partition_all(cfg, clients, seed)):
        path = out / f"site-{i}.{fmt}"
        _write(path, raw(pool.x[idx]), pool.y[idx], fmt, 255.0)
        paths.append(path)
    _write(out / f"test.{fmt}", raw(test.x), test.y, fmt, 255.0)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedpriv export-sites", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--format", default="csv", choices=FORMATS)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--partitioner", default="iid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        paths = export_sites(args.dataset, args.format, args.clients, args.out, args.seed,
                             args.partitioner)
    except ValueError as ex:
        print(f"fedpriv export-sites: {ex}", file=sys.stderr)
        return 2
    sites = ",".join(str(q) for q in paths)
    print(f"wrote {len(paths)} site files and {args.out / ('test.' + args.format)}")
    print(f"try: fedpriv simulate dataset={args.format} dataset.sites='[{sites}]' "
          f"dataset.test_path={args.out / ('test.' + args.format)}")
    return 0
