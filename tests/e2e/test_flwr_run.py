"""End to end: ``flwr run . local`` through Flower's background local SuperLink.

``flwr run . local`` (flwr 1.42) reads the connection ``local`` (address
``":local:"``) from ``$FLWR_HOME/config.toml`` (created with defaults on first
use), starts a detached ``flower-superlink --simulation`` if nothing answers
on ``127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT/health`` (default 39091),
submits the FAB, and with ``--stream`` prints the run's logs until it ends.
The SuperLink (and its ``flower-superexec``) keep running afterwards; flwr has
no command to stop them (``flwr stop`` stops a run), so this test kills every
process that carries its own marker in the environment (the CLI passes its
environment down to the SuperLink, which passes it to SuperExec,
``flwr-simulation`` and Ray), or that lives in one of their sessions.

Isolation: ``FLWR_HOME`` is a tmp folder, and the SuperLink gets free ports
so that it never reuses a SuperLink someone else started on the default port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).parent / "flwr"
MARKER = "FEDPRIV_E2E_FLWR_RUN"
ROUNDS, CLIENTS = 2, 3
RUN_TIMEOUT_S = 360.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> tuple[str, int]:
    """(state, session id) of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[3])


def _our_pids(needles: set[bytes], sids: set[int]) -> list[int]:
    """Live (non-zombie) processes with one of ``needles`` in their environment or in
    one of the sessions ``sids``. Ray's agents overwrite part of their environment
    with their process title, so the session is the fallback that finds them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            state, sid = _stat(pid)
            if state == "Z":
                continue
            if sid in sids or needles & set((entry / "environ").read_bytes().split(b"\0")):
                found.append(pid)
        except (OSError, IndexError, ValueError):  # gone, or not ours to read
            continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(needles: set[bytes], sids: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _our_pids(needles, sids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _stop_everything(cli: subprocess.Popen[bytes] | None, needles: set[bytes]) -> list[str]:
    """Stop the CLI, the background SuperLink and all it spawned; return survivors."""
    if cli is not None and cli.poll() is None:
        cli.terminate()
        try:
            cli.wait(timeout=10)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.wait(timeout=10)
    # flwr starts the SuperLink, the SuperLink its SuperExec, each in a new session;
    # flwr-simulation and Ray stay in SuperExec's session.
    sids: set[int] = set()
    for pid in _our_pids(needles, set()):
        try:
            sids.add(_stat(pid)[1])
        except (OSError, IndexError, ValueError):
            pass
    sids.discard(os.getsid(0))  # never pytest's own session
    # SuperLink first: on SIGTERM it shuts down its SuperExec and the run itself.
    superlinks = [p for p in _our_pids(needles, sids) if "flower-superlink" in _cmdline(p)]
    _signal(superlinks, signal.SIGTERM)
    left = _wait_gone(needles, sids, 15)
    _signal(left, signal.SIGTERM)  # whatever is left: SuperExec, flwr-simulation, Ray
    left = _wait_gone(needles, sids, 10)
    _signal(left, signal.SIGKILL)  # Ray's agents catch SIGTERM and may not exit
    return [f"{p}: {_cmdline(p)}" for p in _wait_gone(needles, sids, 10)]


def _tail(path: Path, n: int = 60) -> str:
    if not path.exists():
        return f"<{path} missing>"
    lines = path.read_text(errors="replace").splitlines()
    return f"--- {path} (last {n} lines)\n" + "\n".join(lines[-n:])


@pytest.mark.slow
@pytest.mark.skipif(not FLWR.exists(), reason=f"the flwr CLI is not installed at {FLWR}")
def test_flwr_run_local_writes_the_run_directory(tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr-home"
    run_dir = tmp_path / "run"
    cli_log = tmp_path / "flwr-run.log"
    token = uuid.uuid4().hex
    needles = {f"{MARKER}={token}".encode(), f"FLWR_HOME={flwr_home}".encode()}
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        # `flwr` starts `flower-superlink` by name, from PATH.
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # The app's dependencies are already installed here; without this the
        # SuperLink would `uv sync` them into a fresh environment per run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        MARKER: token,
    }
    cmd = [
        str(FLWR), "run", ".", "local", "--stream",
        "--federation-config", f"num-supernodes={CLIENTS} client-resources-num-cpus=1",
        # One --run-config string: flwr 1.42 merges repeated --run-config options
        # with a shallow dict.update, so `-c 'fedpriv.a=1' -c 'fedpriv.b=2'` loses
        # fedpriv.a (both live in the table `fedpriv`).
        "--run-config",
        f'fedpriv.overrides="train.rounds={ROUNDS} simulation.num_clients={CLIENTS}" '
        f'fedpriv.run-dir="{run_dir}"',
    ]
    summary_path = run_dir / "summary.json"
    cli: subprocess.Popen[bytes] | None = None
    t0 = time.monotonic()
    try:
        with cli_log.open("wb") as out:
            cli = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)

        def diagnostics() -> str:
            return "\n".join([
                f"after {time.monotonic() - t0:.0f}s; flwr exit code {cli.poll()}",
                _tail(cli_log),
                _tail(flwr_home / "local-superlink" / "superlink.log", 30),
                _tail(run_dir / "fedpriv.log", 30),
            ])

        summary = None
        exited_at = None
        while time.monotonic() - t0 < RUN_TIMEOUT_S:
            if summary_path.exists():  # written atomically, after everything else
                summary = json.loads(summary_path.read_text())
                break
            rc = cli.poll()
            if rc is not None:
                assert rc == 0, f"`flwr run` failed\n{diagnostics()}"
                # --stream returns when the run ends; a finished run has its summary.
                exited_at = exited_at or time.monotonic()
                assert time.monotonic() - exited_at < 10, (
                    f"the run ended without writing {summary_path}\n{diagnostics()}"
                )
            time.sleep(1)
        assert summary is not None, (
            f"no {summary_path} within {RUN_TIMEOUT_S:.0f}s\n{diagnostics()}"
        )

        assert summary["rounds"] == ROUNDS
        assert summary["num_clients"] == CLIENTS
        assert 0.0 <= summary["accuracy"] <= 1.0
        assert summary["epsilon_sample_level_max"] > 0
        rounds = [json.loads(line) for line in
                  (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
        for r in rounds:
            assert sorted(c["client"] for c in r["clients"]) == list(range(CLIENTS))
        for name in ("config.yaml", "model.safetensors", "fedpriv.log"):
            assert (run_dir / name).is_file(), name
        # The FAB was installed under the tmp FLWR_HOME, not ~/.flwr.
        assert any((flwr_home / "apps").iterdir())
    finally:
        survivors = _stop_everything(cli, needles)
    assert not survivors, f"processes left running: {survivors}"
