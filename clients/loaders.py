"""Read one site's files into raw arrays, checked against the task schema.

A loader either returns every record of the site or raises :class:`LoaderError`
whose message starts with the offending path and names the problem; it never
returns part of a file. It does not clean: missing or unparseable feature
values come back as NaN, duplicate rows are kept and labels are returned as
read, for the cleaning step to drop and count.
"""

from __future__ import annotations

import gzip
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from clients.schema import SchemaError, TaskSchema

if TYPE_CHECKING:  # imported where used: a client worker on bundled data reads no table
    import pandas as pd

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "LoaderError", "RawData", "load_site", "infer_schema"]

FORMATS = ("csv", "parquet", "npz", "idx", "images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_TABULAR = ("csv", "parquet")
_NPZ_KEYS = (("x", "y"), ("X", "y"), ("images", "labels"))
_IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
_IDX_LABELS = 0x00000801  # unsigned bytes, 1 dimension (N,)
_IDX_NAME = re.compile(r"(images|labels)([-.])idx([13])-ubyte(\.gz)?$")
# Modes with more than 8 bits per channel: PIL's convert() would clip them.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# What the third-party readers raise for a malformed file.
_READ_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    zlib.error,
    zipfile.BadZipFile,
    struct.error,
    NotImplementedError,
)


class LoaderError(ValueError):
    """A site's files cannot be read as asked; the message starts with the path."""


@dataclass(frozen=True)
class RawData:
    """One site's records as read, before any cleaning.

    Attributes
    ----------
    x : float64. Tabular: ``(N, F)`` in ``schema.features`` order, NaN where a
        value was missing, unparseable or not finite. Image: ``(N, C, H, W)``
        scaled to [0, 1].
    labels : the N raw label values as read (object or numeric); map them with
        :meth:`TaskSchema.label_index`.
    source : the path that was read.
    rows_read : N.
    """

    x: np.ndarray
    labels: np.ndarray
    source: str
    rows_read: int

    def __post_init__(self) -> None:
        if not (self.x.shape[0] == self.labels.shape[0] == self.rows_read):
            raise ValueError(
                f"RawData: x has {self.x.shape[0]} rows, labels {self.labels.shape[0]}, "
                f"rows_read={self.rows_read}"
            )

    def __len__(self) -> int:
        return self.rows_read


def _checked_path(path: str | Path, fmt: str) -> Path:
    path = Path(path)
    if fmt not in FORMATS:
        raise LoaderError(f"{path}: unknown format {fmt!r}; expected one of {FORMATS}")
    if not path.exists():
        raise LoaderError(f"{path}: no such file or directory")
    return path


# --- tabular: csv, parquet -------------------------------------------------------------


def _read_table(path: Path, fmt: str) -> pd.DataFrame:
    import pandas as pd

    if fmt == "csv":
        # All columns as text: no type guessing per file ("007" stays "007");
        # features are parsed below, labels are matched by the schema.
        return pd.read_csv(path, dtype=str)
    return pd.read_parquet(path)


def _numeric(column: pd.Series) -> np.ndarray:
    """float64 values; missing, unparseable and non-finite values become NaN."""
    import pandas as pd

    parsed = pd.to_numeric(column, errors="coerce")
    values = parsed.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    values[~np.isfinite(values)] = np.nan
    return values


def _label_values(column: pd.Series) -> np.ndarray:
    """Raw labels: numeric as numpy numbers, anything else as objects with None for NA."""
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "iufb":
        return column.to_numpy(copy=True)
    return column.astype(object).where(column.notna(), None).to_numpy(dtype=object)


def _require_columns(path: Path, frame: pd.DataFrame, wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        found = [str(c) for c in frame.columns]
        raise LoaderError(f"{path}: missing columns {missing}; the file has {found[:30]}")


def _require_unique_header(path: Path, wanted: Sequence[str]) -> None:
    """pandas renames a repeated CSV column ``a`` to ``a.1``; refuse to guess which is meant."""
    import pandas as pd

    header = pd.read_csv(path, header=None, nrows=1, dtype=str).iloc[0].tolist()
    repeated = sorted({c for c in wanted if header.count(c) > 1})
    if repeated:
        raise LoaderError(f"{path}: columns {repeated} appear more than once in the header")


def _tabular(path: Path, fmt: str, schema: TaskSchema) -> tuple[np.ndarray, np.ndarray]:
    frame = _read_table(path, fmt)
    wanted = [*schema.features, schema.label_column]
    if fmt == "csv" and len(frame.columns) > 0:
        _require_unique_header(path, wanted)
    _require_columns(path, frame, wanted)
    x = np.empty((len(frame), len(schema.features)), dtype=np.float64)
    for j, name in enumerate(schema.features):
        x[:, j] = _numeric(frame[name])
    return x, _label_values(frame[schema.label_column])


# --- arrays: npz, idx --------------------------------------------------------------------


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise LoaderError(f"{path}: a single .npy array, not an .npz archive of x and y")
    with loaded:
        names = list(loaded.files)
        for x_key, y_key in _NPZ_KEYS:
            if x_key in names and y_key in names:
                x, y = loaded[x_key], loaded[y_key]
                break
        else:
            raise LoaderError(
                f"{path}: expected arrays x and y (or X and y, or images and labels); "
                f"the archive has {names}"
            )
    if x.ndim == 0 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise LoaderError(
            f"{path}: labels must be 1-D with one per record; x has shape {x.shape}, "
            f"labels {y.shape}"
        )
    return x, y


def _image_x(path: Path, x: np.ndarray, schema: TaskSchema) -> np.ndarray:
    """Check an image array against the schema and scale it to float64 in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1:] != schema.input_shape:
        found = x.shape[1:] if x.ndim == 4 else x.shape
        raise LoaderError(
            f"{path}: expected images of shape (C, H, W)={schema.input_shape}, found {found}"
        )
    if x.dtype.kind in "iu":
        if x.size and x.dtype != np.uint8 and (x.min() < 0 or x.max() > 255):
            raise LoaderError(
                f"{path}: integer pixels must lie in 0..255; found {x.min()}..{x.max()}"
            )
        out = x.astype(np.float64)
        out /= 255.0
        return out
    if x.dtype.kind != "f":
        raise LoaderError(f"{path}: pixels of dtype {x.dtype} are not numbers")
    out = x.astype(np.float64)
    outside = ~((out >= 0.0) & (out <= 1.0))  # NaN is outside too
    if outside.any():
        raise LoaderError(
            f"{path}: float pixels must lie in [0, 1]; {int(outside.sum())} values do not, "
            f"e.g. {out[outside][0]!r}"
        )
    return out


def _tabular_x(path: Path, x: np.ndarray, schema: TaskSchema) -> np.ndarray:
    n_features = len(schema.features)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise LoaderError(
            f"{path}: expected x of shape (N, {n_features}) for features {schema.features}, "
            f"found {x.shape}"
        )
    if x.dtype.kind not in "iufb":
        raise LoaderError(f"{path}: x of dtype {x.dtype} is not numeric")
    out = x.astype(np.float64)
    out[~np.isfinite(out)] = np.nan
    return out


def _idx_files(path: Path) -> tuple[Path, Path]:
    """The (images, labels) IDX files for a directory or an images file."""
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file())
        found: dict[str, list[Path]] = {"images": [], "labels": []}
        for entry in entries:
            match = _IDX_NAME.search(entry.name)
            if match and (match[1], match[3]) in (("images", "3"), ("labels", "1")):
                found[match[1]].append(entry)
        if len(found["images"]) != 1 or len(found["labels"]) != 1:
            names = {k: [p.name for p in v] for k, v in found.items()}
            raise LoaderError(
                f"{path}: expected exactly one *images-idx3-ubyte[.gz] and one "
                f"*labels-idx1-ubyte[.gz] file, found {names}; pass the images file instead"
            )
        return found["images"][0], found["labels"][0]
    match = _IDX_NAME.search(path.name)
    if match is None or match[1] != "images":
        raise LoaderError(
            f"{path}: not an IDX images file (a name like *images-idx3-ubyte[.gz]) "
            "nor a directory holding one"
        )
    stem = path.name[: match.start()] + f"labels{match[2]}idx1-ubyte"
    for name in (stem + (match[4] or ""), stem + ("" if match[4] else ".gz")):
        if (path.parent / name).is_file():
            return path, path.parent / name
    raise LoaderError(f"{path}: its labels file {stem}[.gz] is not in {path.parent}")


def _idx_array(file: Path, magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes, gzipped or not; all or nothing."""
    data = file.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as err:
            raise LoaderError(f"{file}: corrupt or truncated gzip: {err}") from err
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise LoaderError(f"{file}: truncated: {len(data)} bytes, an IDX header needs {header}")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise LoaderError(f"{file}: IDX magic number 0x{found:08X}, expected 0x{magic:08X}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    need = int(np.prod(dims, dtype=np.int64))
    have = len(data) - header
    if have != need:
        problem = "truncated" if have < need else "trailing bytes"
        raise LoaderError(
            f"{file}: {problem}: dimensions {dims} need {need} data bytes, found {have}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = _idx_files(path)
    images = _idx_array(images_file, _IDX_IMAGES)
    labels = _idx_array(labels_file, _IDX_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise LoaderError(
            f"{images_file}: {images.shape[0]} images but {labels_file.name} has "
            f"{labels.shape[0]} labels"
        )
    return images, labels.copy()


# --- a folder of images, one sub-folder per class ---------------------------------------


def _image_files(path: Path) -> list[tuple[Path, str]]:
    """(file, class folder name) for every image, sorted; hidden entries are skipped."""
    if not path.is_dir():
        raise LoaderError(f"{path}: the images format needs a directory of class folders")
    out = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(folder.iterdir()):
            wanted = file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith(".")
            if wanted and file.is_file():
                out.append((file, folder.name))
    return out


def _open_image(file: Path) -> Image.Image:
    """Open and fully decode an image, or raise LoaderError naming the file."""
    try:
        image = Image.open(file)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise LoaderError(f"{file}: cannot decode image: {err}") from err
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        image.close()
        raise LoaderError(f"{file}: cannot decode image: {err}") from err
    if image.mode in _WIDE_MODES:
        image.close()
        raise LoaderError(f"{file}: image mode {image.mode!r} (over 8 bits) is not supported")
    return image


def _folder(path: Path, schema: TaskSchema) -> tuple[np.ndarray, np.ndarray]:
    channels, height, width = schema.input_shape
    if channels not in (1, 3):
        raise LoaderError(
            f"{path}: the images format reads 1 (grayscale) or 3 (RGB) channels; "
            f"schema.input_shape={schema.input_shape}"
        )
    files = _image_files(path)
    mode = "L" if channels == 1 else "RGB"
    by_text = {str(label): label for label in schema.labels}
    pixels = np.empty((len(files), channels, height, width), dtype=np.uint8)
    labels = np.empty(len(files), dtype=object)
    for row, (file, folder) in enumerate(files):
        with _open_image(file) as image:
            if image.size != (width, height):
                raise LoaderError(
                    f"{file}: image is {image.size[0]}x{image.size[1]} (WxH), the schema needs "
                    f"{width}x{height}; images are not resized"
                )
            array = np.asarray(image.convert(mode), dtype=np.uint8)
        pixels[row] = array[None] if channels == 1 else array.transpose(2, 0, 1)
        labels[row] = by_text.get(folder, folder)
    out = pixels.astype(np.float64)
    out /= 255.0
    return out, labels


# --- entry points ------------------------------------------------------------------------


def _read(path: Path, fmt: str, schema: TaskSchema) -> tuple[np.ndarray, np.ndarray]:
    if fmt in _TABULAR:
        return _tabular(path, fmt, schema)
    if fmt == "npz":
        x, y = _read_npz(path)
        if schema.kind == "image":
            return _image_x(path, x, schema), y
        return _tabular_x(path, x, schema), y
    if fmt == "idx":
        images, labels = _read_idx(path)
        return _image_x(path, images, schema), labels
    return _folder(path, schema)


def load_site(path: str | Path, fmt: str, schema: TaskSchema) -> RawData:
    """Read one site's records and check them against the schema.

    Parameters
    ----------
    path : a file, or a directory for ``idx`` (holding one images and one
        labels file) and ``images`` (one sub-folder per class).
    fmt : one of :data:`FORMATS`. ``csv`` and ``parquet`` are tabular,
        ``idx`` and ``images`` are image formats, ``npz`` is either.
    schema : the task schema agreed from configuration.

    Returns
    -------
    RawData
        Every record of the site, uncleaned.

    Raises
    ------
    LoaderError
        For a missing path, an unknown format, a format that does not fit
        ``schema.kind``, a missing column, a shape that differs from the
        schema, a corrupt or truncated file, or no records. The message starts
        with the path of the offending file.
    """
    path = _checked_path(path, fmt)
    fits = "tabular" if fmt in _TABULAR else "image" if fmt in ("idx", "images") else schema.kind
    if fits != schema.kind:
        raise LoaderError(
            f"{path}: format {fmt!r} holds {fits} data but schema.kind={schema.kind!r}"
        )
    try:
        x, labels = _read(path, fmt, schema)
    except LoaderError:
        raise
    except _READ_ERRORS as err:
        raise LoaderError(f"{path}: cannot read as {fmt}: {type(err).__name__}: {err}") from err
    if x.shape[0] == 0:
        raise LoaderError(f"{path}: no records")
    return RawData(x=x, labels=labels, source=str(path), rows_read=int(x.shape[0]))


def _mostly_numeric(column: pd.Series) -> bool:
    """Whether at least half of a column's present values are numbers."""
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(column) or pd.api.types.is_timedelta64_dtype(column):
        return False
    present = column.dropna()
    parsed = pd.to_numeric(present, errors="coerce")
    return len(present) > 0 and 2 * int(parsed.notna().sum()) >= len(present)


def _seen_labels(values: np.ndarray) -> tuple[Any, ...]:
    """Sorted distinct labels: ints when every label is an integer, else stripped text."""
    import pandas as pd

    present = pd.Series(values, dtype=object).dropna()
    present = present[present.map(lambda v: str(v).strip() != "")]
    numbers = pd.to_numeric(present, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isfinite(numbers).all() and (numbers == np.round(numbers)).all():
        return tuple(sorted({int(v) for v in numbers}))
    return tuple(sorted({str(v).strip() for v in present}))


def _infer(path: Path, fmt: str, label_column: str, labels: Sequence[Any] | None) -> TaskSchema:
    if fmt in _TABULAR:
        frame = _read_table(path, fmt)
        _require_columns(path, frame, [label_column])
        if len(frame) == 0:
            raise LoaderError(f"{path}: no records")
        features = tuple(
            str(c) for c in frame.columns if c != label_column and _mostly_numeric(frame[c])
        )
        seen = _label_values(frame[label_column])
        return TaskSchema(
            "tabular", _chosen(labels, seen), features=features, label_column=label_column
        )
    if fmt == "images":
        files = _image_files(path)
        if not files:
            raise LoaderError(f"{path}: no records")
        with _open_image(files[0][0]) as image:
            channels = 1 if image.mode in ("1", "L", "LA") else 3
            shape = (channels, image.size[1], image.size[0])
        folders = np.array(sorted({folder for _, folder in files}), dtype=object)
        return TaskSchema("image", _chosen(labels, folders), input_shape=shape)
    x, y = _read_npz(path) if fmt == "npz" else _read_idx(path)
    if x.shape[0] == 0:
        raise LoaderError(f"{path}: no records")
    if fmt == "npz" and x.ndim == 2:
        names = tuple(f"x{i}" for i in range(x.shape[1]))
        return TaskSchema("tabular", _chosen(labels, y), features=names)
    if x.ndim not in (3, 4):
        raise LoaderError(f"{path}: x of shape {x.shape} is neither (N, F) nor images")
    shape = (1, *x.shape[1:]) if x.ndim == 3 else x.shape[1:]
    return TaskSchema("image", _chosen(labels, y), input_shape=tuple(int(v) for v in shape))


def _chosen(given: Sequence[Any] | None, seen: np.ndarray) -> tuple[Any, ...]:
    if given is None:
        return _seen_labels(seen)
    return tuple(int(v) if isinstance(v, np.integer) else v for v in given)


def infer_schema(
    path: str | Path,
    fmt: str,
    *,
    label_column: str = "label",
    labels: Sequence[Any] | None = None,
) -> TaskSchema:
    """Guess a task schema from one site's files, for when the user gives none.

    Tabular: the features are every non-label column of which at least half
    the present values are numbers, in file order (``npz`` tabular data gets
    names ``x0, x1, ...``). Image: the shape of the first image or of the
    array. Labels, unless given: the sorted distinct labels seen (ints when
    all are integers). A simulation over several site files infers from the
    first file only and loads every site with that schema; a real federation
    builds its schema from configuration instead, since one site may lack a
    class or a column.

    Raises
    ------
    LoaderError
        As :func:`load_site`, and when no valid schema fits the file (e.g.
        only one label seen); the message starts with the path.
    """
    path = _checked_path(path, fmt)
    try:
        return _infer(path, fmt, label_column, labels)
    except LoaderError:
        raise
    except SchemaError as err:
        raise LoaderError(f"{path}: cannot infer a schema: {err}") from err
    except _READ_ERRORS as err:
        raise LoaderError(f"{path}: cannot read as {fmt}: {type(err).__name__}: {err}") from err
