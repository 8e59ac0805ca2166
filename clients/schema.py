"""The task schema that the server and every site agree on.

A :class:`TaskSchema` says what one record looks like (tabular feature columns
or an image shape) and which labels exist, in class-index order. It is built
from configuration on both sides, never from one site's data: a site whose
files hold fewer classes, extra columns or a different column order still maps
its records onto the same model input and the same class indices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["KINDS", "SchemaError", "TaskSchema", "schema_from_dict"]

KINDS = ("tabular", "image")

# Integer-valued floats beyond this are not trusted to be exact class ids.
_INT_LIMIT = 2**53


class SchemaError(ValueError):
    """A task schema is invalid; the message names the field and its value."""


def _fail(field: str, value: Any, why: str) -> SchemaError:
    return SchemaError(f"schema.{field}={value!r}: {why}")


def _as_int(value: Any) -> int | None:
    """The integer a raw label stands for, or ``None``.

    ``3``, ``3.0``, ``"3"``, ``" 3 "`` and ``"3.0"`` all give 3; NaN, None,
    booleans, non-integral numbers and other text give ``None``.
    """
    if value is None or isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isfinite(number) and number.is_integer() and abs(number) < _INT_LIMIT:
            return int(number)
    return None


def _as_text(value: Any) -> str | None:
    """The text a raw label stands for when the label set is strings, or ``None``."""
    if value is None or isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    if isinstance(value, str):
        return value.strip()
    number = _as_int(value)
    return None if number is None else str(number)


@dataclass(frozen=True)
class TaskSchema:
    """What one record looks like and which labels exist.

    Attributes
    ----------
    kind : ``"tabular"`` or ``"image"``.
    labels : the label set in class-index order, all ``int`` or all ``str``;
        at least two. Class ``i`` is ``labels[i]``.
    features : tabular only (required there): feature column names in
        model-input order.
    input_shape : image only (required there): ``(C, H, W)``, positive ints.
    label_column : tabular only: the name of the label column.
    dtype : the floating dtype of the model input, e.g. ``"float32"``.
    """

    kind: str
    labels: tuple[Any, ...]
    features: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = ()
    label_column: str = "label"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise _fail("kind", self.kind, f"expected one of {KINDS}")
        self._check_labels()
        if self.kind == "tabular":
            self._check_tabular()
        else:
            self._check_image()
        try:
            floating = isinstance(self.dtype, str) and np.issubdtype(
                np.dtype(self.dtype), np.floating
            )
        except TypeError:
            floating = False
        if not floating:
            raise _fail("dtype", self.dtype, "expected a floating dtype name such as 'float32'")

    def _check_labels(self) -> None:
        labels = self.labels
        if not isinstance(labels, tuple):
            raise _fail("labels", labels, "expected a tuple (use schema_from_dict for lists)")
        if len(labels) < 2:
            raise _fail("labels", labels, "need at least two labels")
        all_int = all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
        all_str = all(isinstance(v, str) for v in labels)
        if not (all_int or all_str):
            raise _fail("labels", labels, "labels must be all int or all str")
        if all_str and any(v != v.strip() or not v for v in labels):
            raise _fail("labels", labels, "string labels must be non-empty, without outer spaces")
        seen: set[Any] = set()
        for value in labels:
            if value in seen:
                raise _fail("labels", labels, f"duplicate label {value!r}")
            seen.add(value)

    def _check_tabular(self) -> None:
        if not self.features:
            raise _fail("features", self.features, "a tabular schema needs feature columns")
        if not isinstance(self.features, tuple):
            raise _fail("features", self.features, "expected a tuple of column names")
        seen: set[str] = set()
        for name in self.features:
            if not isinstance(name, str) or not name:
                raise _fail("features", self.features, f"bad column name {name!r}")
            if name in seen:
                raise _fail("features", self.features, f"duplicate column {name!r}")
            seen.add(name)
        if not isinstance(self.label_column, str) or not self.label_column:
            raise _fail("label_column", self.label_column, "expected a non-empty column name")
        if self.label_column in seen:
            raise _fail("label_column", self.label_column, "the label column is also a feature")
        if self.input_shape:
            raise _fail("input_shape", self.input_shape, "only an image schema has a shape")

    def _check_image(self) -> None:
        shape = self.input_shape
        ok = (
            isinstance(shape, tuple)
            and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        )
        if not ok:
            raise _fail("input_shape", shape, "an image schema needs (C, H, W), positive ints")
        if self.features:
            raise _fail("features", self.features, "only a tabular schema has feature columns")

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(labels)``."""
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one model input: ``(len(features),)`` or ``(C, H, W)``."""
        return (len(self.features),) if self.kind == "tabular" else self.input_shape

    def label_index(self, raw: Any) -> np.ndarray:
        """Map raw label values to class indices.

        Parameters
        ----------
        raw : 1-D array-like of label values as read from a file (ints,
            floats, strings or a mix).

        Returns
        -------
        numpy.ndarray
            int64, one per value: the index of the value in ``labels``, or -1
            for a value outside the label set, NaN or None. For an integer
            label set, ``3``, ``3.0`` and ``"3"`` are the same label; for a
            string label set, values are compared as stripped text (``3`` and
            ``3.0`` read as ``"3"``). Booleans never match.
        """
        values = np.asarray(raw)
        if values.ndim != 1:
            raise ValueError(
                f"label_index: expected a 1-D array of labels, got shape {values.shape}"
            )
        if isinstance(self.labels[0], int) and values.dtype.kind in "iuf":
            return self._index_numeric(values)
        lookup = {label: i for i, label in enumerate(self.labels)}
        convert = _as_int if isinstance(self.labels[0], int) else _as_text
        out = np.full(values.shape[0], -1, dtype=np.int64)
        for row, value in enumerate(values.tolist()):
            key = convert(value)
            if key is not None:
                out[row] = lookup.get(key, -1)
        return out

    def _index_numeric(self, values: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`label_index` for an int label set and numeric input."""
        if values.dtype.kind == "f":
            usable = np.isfinite(values) & (np.abs(values) < _INT_LIMIT)
            usable &= np.floor(np.where(usable, values, 0.0)) == np.where(usable, values, 0.0)
        elif values.dtype.kind == "u":
            usable = values <= np.iinfo(np.int64).max
        else:
            usable = np.ones(values.shape, dtype=bool)
        keys = np.where(usable, values, 0).astype(np.int64)
        known = np.asarray(self.labels, dtype=np.int64)
        order = np.argsort(known)
        pos = np.clip(np.searchsorted(known[order], keys), 0, known.size - 1)
        hit = usable & (known[order][pos] == keys)
        return np.where(hit, order[pos], -1).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary; :func:`schema_from_dict` reads it back."""
        return {
            "kind": self.kind,
            "labels": list(self.labels),
            "num_classes": self.num_classes,
            "features": list(self.features),
            "input_shape": list(self.input_shape),
            "label_column": self.label_column,
            "dtype": self.dtype,
        }


_FIELDS = ("kind", "labels", "features", "input_shape", "label_column", "dtype")


def _to_tuple(field: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        # omegaconf's ListConfig is a Sequence; a bare string is not a list.
        raise _fail(field, value, "expected a list")
    items = list(value)
    return tuple(int(v) if isinstance(v, np.integer) else v for v in items)


def schema_from_dict(d: Mapping[str, Any]) -> TaskSchema:
    """Build a :class:`TaskSchema` from a mapping such as a hydra config node.

    Lists become tuples. ``num_classes`` (as written by
    :meth:`TaskSchema.describe`) is accepted when it equals the number of
    labels; any other unknown key is an error.

    Raises
    ------
    SchemaError
        For an unknown key, a missing ``kind``/``labels`` or any invalid value.
    """
    unknown = sorted(str(k) for k in d if k not in _FIELDS and k != "num_classes")
    if unknown:
        raise SchemaError(f"schema: unknown keys {unknown}; expected some of {_FIELDS}")
    for key in ("kind", "labels"):
        if key not in d:
            raise SchemaError(f"schema.{key}: missing")
    kwargs: dict[str, Any] = {k: d[k] for k in _FIELDS if k in d}
    for key in ("labels", "features", "input_shape"):
        if key in kwargs:
            kwargs[key] = _to_tuple(key, kwargs[key])
    schema = TaskSchema(**kwargs)
    if "num_classes" in d and d["num_classes"] != schema.num_classes:
        raise _fail("num_classes", d["num_classes"], f"but {schema.num_classes} labels given")
    return schema
