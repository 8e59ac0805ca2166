"""Typed reads from Flower records, with an error that names the missing or bad key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = ["RecordError", "number", "integer", "numbers", "array_record", "config_record",
           "metric_record"]


class RecordError(ValueError):
    """A message lacks a key or carries a value of the wrong type."""


def _get(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise RecordError(f"missing key {key!r} (have {sorted(record)})")
    return record[key]


def number(record: Mapping[str, Any], key: str) -> float:
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{key}={value!r}: expected a number")
    return float(value)


def integer(record: Mapping[str, Any], key: str) -> int:
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"{key}={value!r}: expected an integer")
    return value


def numbers(record: Mapping[str, Any], key: str) -> list[float]:
    value = _get(record, key)
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
        raise RecordError(f"{key}={value!r}: expected a list of numbers")
    return [float(v) for v in value]


def _typed(content: RecordDict, key: str, cls: type) -> Any:
    value = _get(content, key)
    if not isinstance(value, cls):
        raise RecordError(f"{key}: expected a {cls.__name__}, got {type(value).__name__}")
    return value


def array_record(content: RecordDict, key: str = "arrays") -> ArrayRecord:
    return _typed(content, key, ArrayRecord)  # type: ignore[no-any-return]


def config_record(content: RecordDict, key: str = "config") -> ConfigRecord:
    return _typed(content, key, ConfigRecord)  # type: ignore[no-any-return]


def metric_record(content: RecordDict, key: str = "metrics") -> MetricRecord:
    return _typed(content, key, MetricRecord)  # type: ignore[no-any-return]
