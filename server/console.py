"""What a person sees: one line per round and a progress bar; the rest goes to a log file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["route_logs_to_file", "RoundReporter"]

LOG_FILE = "fedpriv.log"


_ROUTED = ("flwr", "ray", "py.warnings", "fedpriv", "")


def _is_console(h: logging.Handler) -> bool:
    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)


def route_logs_to_file(run_dir: Path) -> logging.Handler:
    """Send Flower's, Ray's, fedpriv's logs and Python warnings to ``run_dir/fedpriv.log``.

    Flower (and sometimes Ray, on the root logger) install console handlers;
    they are taken off for the run, so the console shows only the round lines,
    and put back by :func:`remove_log_handler`.
    """
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._fedpriv_removed = []  # type: ignore[attr-defined]
    logging.captureWarnings(True)
    for name in _ROUTED:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if name == "flwr" else logging.INFO)
        for h in [h for h in logger.handlers if _is_console(h)]:
            logger.removeHandler(h)
            handler._fedpriv_removed.append((logger, h))  # type: ignore[attr-defined]
        logger.propagate = not name
        logger.addHandler(handler)
    return handler


def remove_log_handler(handler: logging.Handler) -> None:
    """Undo :func:`route_logs_to_file`."""
    for name in _ROUTED:
        logging.getLogger(name).removeHandler(handler)
    for logger, h in getattr(handler, "_fedpriv_removed", []):
        logger.addHandler(h)
    handler.close()


def _fmt(value: Any) -> str:
    return "  n/a" if value is None or value != value else f"{value:.4f}"


class RoundReporter:
    """Rich progress bar plus one printed line per round."""

    def __init__(self, total_rounds: int, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=False, highlight=False)
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]fedpriv[/bold] rounds"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=True,
            disable=not enabled,
        )
        self._task = self._progress.add_task("rounds", total=total_rounds)

    def __enter__(self) -> RoundReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def line(self, text: str) -> None:
        self.console.print(text)

    def round_done(self, record: dict[str, Any], eps_max: float) -> None:
        c = record["central"]
        self.line(
            f"round {record['round']:>3}  accuracy {_fmt(c['accuracy'])}  "
            f"f1_macro {_fmt(c['f1_macro'])}  eps_max {eps_max:.3f}  "
            f"({record['wall_seconds']:.1f}s)"
        )
        self._progress.advance(self._task)
