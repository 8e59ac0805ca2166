"""``fedpriv deploy-local``: a real Flower deployment on one machine (loopback).

Runs every step an operator runs for a deployment (see ``docs/deploy.md``), with
the same commands and flags, and then stops everything it started:

1. ``make_keys``: CA, SuperLink certificate (127.0.0.1, localhost), one
   SuperNode key pair per site, under ``DIR/keys``;
2. ``export_sites``: one data file per site plus ``test.EXT`` under ``DIR/data``;
3. ``flower-superlink`` with TLS, SuperNode authentication, a persistent
   ``--database`` and a gRPC health service; waits until it is ``SERVING``;
4. ``DIR/flwr-home/config.toml``: the connection ``fedpriv`` (TLS, our CA);
   ``flwr supernode register`` for each site's public key;
5. one ``flower-supernode`` per site, with the CA, its private key and its
   node config (``data-path``, ``data-format``, ``state-dir``, ...);
6. ``flwr run . fedpriv --stream`` with the run's overrides; the run directory
   is ``DIR/run`` and each site's ledger ``DIR/sites/site-i/ledger.sqlite``.

Every process is started in its own session and stopped, with its children, by
process group (SIGTERM, then SIGKILL after a grace period), also on failure or
Ctrl-C. Logs: ``DIR/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DeployError", "Deployment", "LocalFederation", "deploy_local", "main"]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "fedpriv"
GRACE_S = 15.0
MARKER = "FEDPRIV_DEPLOY_LOCAL"  # in every started process's environment

# The format each bundled data set is exported in (images: npz; tabular: csv).
_FORMATS = {"digits": "npz", "mnist5k": "npz", "fashion-mnist": "npz",
            "breast-cancer": "csv"}


class DeployError(RuntimeError):
    """A step of the local deployment failed; the message names the log to read."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exe(name: str) -> str:
    """A Flower executable: next to this Python first, then on PATH."""
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def _tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"<{path} missing>"
    lines = path.read_text(errors="replace").splitlines()
    return f"--- {path} (last {n} lines)\n" + "\n".join(lines[-n:])


class Deployment:
    """The processes of one local deployment; ``stop()`` ends them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = workdir / "flwr-home"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.token = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # Use this environment's packages; no `uv sync` per run.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            # Flower starts some children (the SuperLink's SuperExec and its ServerApp)
            # in new sessions; they inherit this, which is how stop() finds them.
            MARKER: self.token,
        }

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p in self.procs]

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``args`` in a new session (its own process group), logging to logs/NAME.log."""
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                    env=env or self.env, cwd=cwd, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_exe("flwr"), *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def alive(self) -> list[int]:
        """Live (non-zombie) processes we started, or that carry our marker."""
        return _live(self.token, {p.pid for _, p in self.procs})

    def stop(self, grace: float = GRACE_S) -> None:
        """SIGTERM every process group we started (newest first) and every process
        carrying our marker; SIGKILL whatever is left after ``grace`` seconds."""
        groups = [p.pid for _, p in reversed(self.procs)]
        for pgid in groups:
            _killpg(pgid, signal.SIGTERM)
        self._wait_gone(grace)
        for pid in self.alive():  # e.g. a SuperExec in its own session
            _kill(pid, signal.SIGTERM)
        self._wait_gone(5)
        for pgid in groups:
            _killpg(pgid, signal.SIGKILL)
        for pid in self.alive():
            _kill(pid, signal.SIGKILL)
        self._wait_gone(10)

    def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for _, p in self.procs:
                p.poll()  # reap our direct children
            if not self.alive() or time.monotonic() > deadline:
                return
            time.sleep(0.2)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _live(token: str, pgids: set[int]) -> list[int]:
    """Non-zombie processes in one of ``pgids`` or with ``MARKER=token`` in their
    environment (never this process)."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            if int(fields[2]) in pgids or needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _node_config(values: dict[str, object]) -> str:
    parts = []
    for key, value in values.items():
        parts.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return " ".join(parts)


def _wait_online(dep: Deployment, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    online = 0
    while time.monotonic() < deadline:
        for name, proc in dep.procs:
            if name.startswith("supernode-") and proc.poll() is not None:
                raise DeployError(f"{name} exited with {proc.returncode}\n"
                                  f"{_tail(dep.logs / f'{name}.log')}")
        done = dep.flwr("supernode", "ls", "--format", "json")
        if done.returncode == 0:
            nodes = json.loads(done.stdout).get("nodes", [])
            online = sum(1 for x in nodes if x.get("status") == "online")
            if online >= n:
                return
        time.sleep(1)
    raise DeployError(f"only {online} of {n} SuperNodes online after {timeout:.0f}s; "
                      f"see {dep.logs}")


class LocalFederation:
    """One SuperLink and its SuperNodes on loopback, step by step (``deploy_local``'s parts).

    Each method is one step of ``docs/deploy.md`` with the same flags; the
    failure tests use them to kill and restart single processes.
    """

    def __init__(self, dep: Deployment, names: Sequence[str], *, dataset: str = "digits",
                 extra_keys: Sequence[str] = ()) -> None:
        from server.keys import make_keys

        fmt = _FORMATS.get(dataset)
        if fmt is None:
            raise ValueError(f"dataset={dataset!r}: choose one of {sorted(_FORMATS)}")
        self.dep, self.names, self.dataset, self.fmt = dep, list(names), dataset, fmt
        self.workdir = dep.workdir
        # `extra_keys`: key pairs for nodes that are not sites of the run (tests).
        self.keys = make_keys(self.workdir / "keys", [*self.names, *extra_keys],
                              hosts=("127.0.0.1", "localhost"))
        self.port, self.health = _free_port(), f"127.0.0.1:{_free_port()}"
        self.data_paths: list[Path] = []
        self.test_path: Path | None = None
        self.labels: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def export_data(self) -> None:
        """One data file per site plus the server's held-out ``test.EXT``."""
        from simulations.export import export_sites

        self.data_paths = export_sites(self.dataset, self.fmt, len(self.names),
                                       self.workdir / "data")
        self.test_path = self.workdir / "data" / f"test.{self.fmt}"
        self.labels = _labels(self.data_paths[0], self.fmt)

    def start_superlink(self, *, timeout: float = 120.0) -> subprocess.Popen[bytes]:
        """``flower-superlink`` with TLS, SuperNode auth and ``DIR/superlink.db``; waits
        until its health service answers ``SERVING``."""
        from server.health import wait_healthy

        k = self.keys
        proc = self.dep.start("superlink", [
            _exe("flower-superlink"),
            "--ssl-ca-certfile", str(k.ca_cert),
            "--ssl-certfile", str(k.server_cert),
            "--ssl-keyfile", str(k.server_key),
            "--enable-supernode-auth",
            "--database", str(self.workdir / "superlink.db"),
            "--disable-runtime-dependency-installation",
            "--port", str(self.port),
            "--health-server-address", self.health,
        ])  # fmt: skip
        try:
            wait_healthy(self.health, timeout=max(1.0, timeout), interval=0.3)
        except TimeoutError as ex:
            raise DeployError(f"SuperLink not healthy: {ex}\n"
                              f"{_tail(self.dep.logs / 'superlink.log')}") from ex
        return proc

    def connect_cli(self) -> None:
        """``FLWR_HOME/config.toml``: the connection the ``flwr`` CLI uses (TLS, our CA)."""
        self.dep.home.mkdir(parents=True, exist_ok=True)
        (self.dep.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {_toml_str(self.address)}\n"
            f"root-certificates = {_toml_str(str(self.keys.ca_cert))}\n"
        )

    def register(self, name: str) -> str:
        """``flwr supernode register`` the site's public key; returns the CLI's answer."""
        done = self.dep.flwr("supernode", "register", str(self.keys.site_keys[name][1]),
                             CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise DeployError(f"`flwr supernode register` failed for {name}:\n"
                              f"{done.stdout}\n{done.stderr}")
        return done.stdout.strip()

    def start_supernode(self, name: str, *, root_certificates: Path | None = None,
                        insecure: bool = False, auth: bool = True, extra: Sequence[str] = (),
                        node_config: dict[str, object] | None = None,
                        ) -> subprocess.Popen[bytes]:
        """``flower-supernode`` for site ``name`` (its CA, private key, node config).

        ``root_certificates`` (another CA), ``insecure`` and ``auth=False`` (no
        private key) exist for the tests that check such a node is refused.
        """
        i = self.names.index(name) if name in self.names else len(self.names)
        state_dir = self.workdir / "sites" / name
        state_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "partition-id": i, "num-partitions": len(self.names), "site-name": name,
            "state-dir": str(state_dir),
        }
        if self.data_paths and name in self.names:
            config.update({"data-path": str(self.data_paths[i]), "data-format": self.fmt})
        config.update(node_config or {})
        tls = ["--insecure"] if insecure else [
            "--root-certificates", str(root_certificates or self.keys.ca_cert)]
        env = {**self.dep.env, "FLWR_HOME": str(self.workdir / "supernode-homes" / name)}
        return self.dep.start(f"supernode-{name}", [
            _exe("flower-supernode"),
            "--superlink", self.address,
            *tls,
            *(["--auth-supernode-private-key", str(self.keys.site_keys[name][0])] if auth
              else []),
            "--port", str(_free_port()),
            "--node-config", _node_config(config),
            *extra,
        ], env=env)  # fmt: skip

    def online(self) -> dict[int, str]:
        """Node id -> status, as ``flwr supernode ls`` reports it ({} if it cannot)."""
        done = self.dep.flwr("supernode", "ls", "--format", "json")
        if done.returncode != 0:
            return {}
        nodes = json.loads(done.stdout).get("nodes", [])
        return {int(x["node-id"]): str(x.get("status")) for x in nodes if "node-id" in x}

    def wait_online(self, n: int, timeout: float) -> None:
        _wait_online(self.dep, n, timeout)

    def overrides(self, rounds: int, extra: Sequence[str] = ()) -> str:
        """The run's hydra overrides: the sites' schema, file format and test file."""
        sites = len(self.names)
        return " ".join([
            f"train.rounds={rounds}", f"simulation.num_clients={sites}",
            f"strategy.min_train_clients={sites}", f"dataset={self.fmt}",
            f"dataset.labels=[{','.join(self.labels)}]",
            f"dataset.sites=[{','.join(str(p) for p in self.data_paths)}]",
            f"dataset.test_path={self.test_path}", *extra,
        ])

    def submit(self, overrides: str, run_dir: Path, *, name: str = "flwr-run",
               ) -> subprocess.Popen[bytes]:
        """``flwr run . fedpriv --stream`` with one ``--run-config`` string."""
        run_config = (f"fedpriv.overrides={_toml_str(overrides)} "
                      f"fedpriv.run-dir={_toml_str(str(run_dir))}")
        cmd = [_exe("flwr"), "run", ".", CONNECTION, "--stream", "--run-config", run_config]
        print(f"deploy-local: {' '.join(_quote(c) for c in cmd)}", flush=True)
        return self.dep.start(name, cmd, cwd=REPO)

    def wait_run(self, cli: subprocess.Popen[bytes], run_dir: Path, deadline: float, *,
                 name: str = "flwr-run", echo: bool = True, cli_may_exit: bool = False) -> Path:
        """Wait for ``run_dir/summary.json`` (streaming the CLI's log); check the contract.

        ``cli_may_exit``: keep waiting when ``flwr run --stream`` exits early (it
        does when the SuperLink restarts under it; the run itself goes on).
        """
        log = self.dep.logs / f"{name}.log"
        summary = run_dir / "summary.json"
        shown = 0
        exited_at: float | None = None
        while True:
            if echo:
                shown = _echo(log, shown)
            if summary.exists():
                break
            rc = cli.poll()
            if rc is not None and not cli_may_exit:
                exited_at = exited_at or time.monotonic()
                if rc != 0 or time.monotonic() - exited_at > 15:
                    raise DeployError(f"`flwr run` exited with {rc} and no {summary}; "
                                      f"logs in {self.dep.logs}\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise DeployError(f"no {summary} in time; logs in {self.dep.logs}")
            time.sleep(0.5)
        # summary.json is written last; let --stream print the end of the run.
        end = time.monotonic() + 10
        while cli.poll() is None and time.monotonic() < end:
            time.sleep(0.3)
        if echo:
            _echo(log, shown)
        missing = [n for n in ("summary.json", "metrics.jsonl", "ledger.sqlite",
                               "model.safetensors") if not (run_dir / n).is_file()]
        if missing:
            raise DeployError(f"run directory {run_dir} lacks {missing}")
        return run_dir


def deploy_local(*, sites: int, rounds: int, workdir: Path, dataset: str = "digits",
                 timeout: float = 900, deployment: Deployment | None = None) -> Path:
    """Run a TLS + SuperNode-auth deployment of ``sites`` SuperNodes on loopback.

    Returns the run directory ``workdir/run`` (summary.json, metrics.jsonl,
    ledger.sqlite, model.safetensors). Raises ``DeployError`` when a step or the
    run fails. Every process started is stopped before returning.
    ``deployment`` lets a caller see the processes (tests).
    """
    if sites < 1 or rounds < 1:
        raise ValueError(f"sites={sites}, rounds={rounds}: both must be at least 1")
    if dataset not in _FORMATS:
        raise ValueError(f"dataset={dataset!r}: choose one of {sorted(_FORMATS)}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    deadline = t_start + timeout
    dep = deployment or Deployment(workdir)
    run_dir = workdir / "run"
    try:
        fed = LocalFederation(dep, [f"site-{i}" for i in range(sites)], dataset=dataset)
        fed.export_data()
        fed.start_superlink(timeout=min(120.0, deadline - time.monotonic()))
        print(f"deploy-local: SuperLink SERVING on {fed.address} (health {fed.health})",
              flush=True)
        fed.connect_cli()
        for name in fed.names:
            print(f"deploy-local: registered {name}: {fed.register(name)}", flush=True)
        for name in fed.names:
            fed.start_supernode(name)
        fed.wait_online(sites, timeout=min(120.0, max(1.0, deadline - time.monotonic())))
        print(f"deploy-local: {sites} SuperNodes online", flush=True)
        cli = fed.submit(fed.overrides(rounds), run_dir)
        fed.wait_run(cli, run_dir, deadline)
        print(f"deploy-local: done in {time.monotonic() - t_start:.0f}s; run directory "
              f"{run_dir}; site ledgers under {workdir / 'sites'}", flush=True)
        return run_dir
    finally:
        dep.stop()


def _labels(path: Path, fmt: str) -> list[str]:
    import numpy as np

    if fmt == "npz":
        with np.load(path) as z:
            y = z["y"]
    else:
        import pandas as pd

        y = pd.read_csv(path)["label"].to_numpy()
    return [str(v) for v in sorted(set(y.tolist()))]


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _echo(log: Path, offset: int) -> int:
    """Print what ``log`` gained since ``offset``; return the new offset."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return offset
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedpriv deploy-local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--dataset", default="digits", choices=sorted(_FORMATS))
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    try:
        run_dir = deploy_local(sites=args.sites, rounds=args.rounds, workdir=args.workdir,
                               dataset=args.dataset, timeout=args.timeout)
    except ValueError as ex:
        print(f"fedpriv deploy-local: {ex}", file=sys.stderr)
        return 2
    except DeployError as ex:
        print(f"fedpriv deploy-local: failed: {ex}\nlogs: {args.workdir.resolve() / 'logs'}",
              file=sys.stderr)
        return 1
    print(f"fedpriv deploy-local: run directory {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
