"""The ``fedpriv`` console script: ``fedpriv SUBCOMMAND [ARGS…]``."""

from __future__ import annotations

import sys

USAGE = """usage: fedpriv <command> [args]

commands:
  simulate [HYDRA OVERRIDES…]   run a local federated simulation (Flower + Ray)
                                e.g. fedpriv simulate train.rounds=5 model=cnn
                                     fedpriv simulate --multirun privacy.target_epsilon=1,3,8
  export-sites --dataset D --format csv|parquet|npz --clients N --out DIR
                                write a bundled data set out as one file per site
  audit RUN_DIR [--delta D] [--format md|html|json] [--out PATH]
                                verify a run's privacy ledger and recompute every epsilon
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "simulate":
        from simulations.simulate import hydra_main

        # hydra reads sys.argv: hand it the overrides as if it were the program.
        sys.argv = [f"{sys.argv[0]} simulate", *rest]
        try:
            hydra_main()
        except Exception as ex:  # the traceback is in the run's log file too
            print(f"fedpriv: run failed: {ex}", file=sys.stderr)
            return 1
        return 0
    if command == "export-sites":
        from simulations.export import main as export_main

        return export_main(rest)
    if command == "audit":
        from server.audit import main as audit_main

        return audit_main(rest)
    print(f"fedpriv: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
