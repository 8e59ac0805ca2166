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


def charge_record(row: Any) -> ConfigRecord:
    """A committed ledger row (``privacy.ledger.LedgerRow``) as a ConfigRecord for a reply.

    The server mirrors the charge from it field by field (``charge_from_record``)
    and cites the site's row by ``site#seq:hash``.
    """
    from dataclasses import asdict

    content = {k: v for k, v in asdict(row.charge).items() if v is not None}
    return ConfigRecord({**content, "seq": row.seq, "hash": row.hash})


def charge_from_record(record: ConfigRecord, **override: Any) -> Any:
    """The ``privacy.ledger.Charge`` a reply reports, validated (``LedgerError`` if bad).

    ``override`` replaces fields the receiver decides itself (e.g. ``round``).
    """
    from dataclasses import fields

    from privacy.ledger import Charge

    names = [f.name for f in fields(Charge)]
    missing = [n for n in ("run_id", "site", "level", "noise_multiplier", "clipping_norm",
                           "sample_rate", "steps", "delta") if n not in record]
    if missing:
        raise RecordError(f"ledger record lacks {missing}")
    values: dict[str, Any] = {n: record[n] for n in names if n in record}
    values.update(override)
    digest = record.get("hash")
    if not isinstance(digest, str):
        raise RecordError(f"hash={digest!r}: expected the site's row hash")
    values["source"] = f"{values['site']}#{integer(record, 'seq')}:{digest}"
    return Charge(**values)
