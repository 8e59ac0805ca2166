"""``fedpriv bench``: what fedpriv costs and how fast it runs, measured on this machine.

Suites (:data:`SUITES`): ``quick`` (minutes), ``full`` (hours), ``tiny`` (tests).
Each writes ``results.json`` (keys ``dp_overhead``, ``profile``, ``simulation``,
``memory_growth``, ``accuracy_vs_epsilon``) and ``results.md`` with plots.
Nothing outside this package imports it.
"""

from simulations.benchmarks.cli import SECTIONS, main, run_suite
from simulations.benchmarks.suites import SUITES, Suite

__all__ = ["SECTIONS", "SUITES", "Suite", "main", "run_suite"]
