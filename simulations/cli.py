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
  keys --out DIR --sites a,b[,...] [--hosts H,...] [--force]
                                a CA, a TLS server certificate and one SuperNode auth key per site
  deploy-local --sites N --rounds R --workdir DIR
                                a real SuperLink + N SuperNodes (TLS, node authentication) on
                                loopback: keys, site data, the run, its run directory
  health HOST:PORT [--timeout S]
                                ask a process's gRPC health service; exit 0 only when it serves
  audit RUN_DIR [--delta D] [--format md|html|json] [--out PATH]
                                verify a run's privacy ledger and recompute every epsilon
  bench quick|full --out DIR    benchmarks: DP cost, accuracy vs epsilon, throughput against a
                                naive Flower + Opacus baseline, memory growth (results.json/.md)
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "simulate":
        from server.app import quote_group_choices
        from simulations.simulate import hydra_main

        # hydra reads sys.argv: hand it the overrides as if it were the program.
        sys.argv = [f"{sys.argv[0]} simulate", *quote_group_choices(rest)]
        try:
            hydra_main()
        except Exception as ex:  # the traceback is in the run's log file too
            print(f"fedpriv: run failed: {ex}", file=sys.stderr)
            return 1
        return 0
    if command == "export-sites":
        from simulations.export import main as export_main

        return export_main(rest)
    if command == "keys":
        from server.keys import main as keys_main

        return keys_main(rest)
    if command == "deploy-local":
        from server.deploy import main as deploy_main

        return deploy_main(rest)
    if command == "health":
        from server.health import main as health_main

        return health_main(rest)
    if command == "audit":
        from server.audit import main as audit_main

        return audit_main(rest)
    if command == "bench":
        from simulations.benchmarks.cli import main as bench_main

        return bench_main(rest)
    print(f"fedpriv: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
