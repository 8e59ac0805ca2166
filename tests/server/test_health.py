"""``server.health`` against grpcio's own health servicer on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.health import (
    HealthCheckError,
    HealthUnreachableError,
    check_health,
    main,
    wait_healthy,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def served() -> Iterator[tuple[str, health.HealthServicer]]:
    """An insecure grpc health server on 127.0.0.1 (SERVING); yields (address, servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


@pytest.fixture
def closed_address() -> str:
    """A loopback port nobody listens on (bound for a moment, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_main_exits_0_when_serving(
    served: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    address, _ = served

    # Execute
    code = main([address, "--timeout", "5"])

    # Assert
    assert code == 0
    assert capsys.readouterr().out == f"fedpriv health: {address}: SERVING\n"


def test_main_exits_1_when_not_serving(
    served: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    address, servicer = served
    servicer.set("", NOT_SERVING)

    # Execute
    code = main([address])

    # Assert
    assert code == 1
    assert capsys.readouterr().out == f"fedpriv health: {address}: NOT_SERVING\n"


def test_main_exits_1_for_a_service_the_server_does_not_know(
    served: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    address, _ = served

    # Execute
    code = main([address, "--service", "no.such.Service"])

    # Assert: it answered (NOT_FOUND), so it is reachable but not healthy
    assert code == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_main_exits_2_quickly_when_nothing_listens(
    closed_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    start = time.monotonic()
    code = main([closed_address, "--timeout", "3"])
    elapsed = time.monotonic() - start

    # Assert
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedpriv health: unreachable: {closed_address}: UNAVAILABLE")
    assert len(err.strip().splitlines()) == 1
    assert elapsed < 3.5


def test_a_server_that_never_answers_hits_the_deadline() -> None:
    # Prepare: a socket that accepts TCP connections but never speaks HTTP/2
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"

        # Execute
        start = time.monotonic()
        with pytest.raises(HealthUnreachableError) as caught:
            check_health(address, timeout=0.5)
        elapsed = time.monotonic() - start

    # Assert
    assert caught.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert 0.4 < elapsed < 2.5


def test_wait_healthy_returns_once_serving(served: tuple[str, health.HealthServicer]) -> None:
    # Prepare: NOT_SERVING now, SERVING in 0.5 s
    address, servicer = served
    servicer.set("", NOT_SERVING)
    later = threading.Timer(0.5, servicer.set, args=("", SERVING))
    later.start()

    # Execute
    start = time.monotonic()
    try:
        wait_healthy(address, timeout=10, interval=0.1)
    finally:
        later.cancel()
    elapsed = time.monotonic() - start

    # Assert
    assert 0.4 < elapsed < 5
    assert check_health(address) == "SERVING"


def test_wait_healthy_times_out_when_never_serving(
    served: tuple[str, health.HealthServicer],
) -> None:
    # Prepare
    address, servicer = served
    servicer.set("", NOT_SERVING)

    # Execute
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="last: .*NOT_SERVING"):
        wait_healthy(address, timeout=1.0, interval=0.2)
    elapsed = time.monotonic() - start

    # Assert
    assert 1.0 <= elapsed < 3.0


def test_wait_healthy_times_out_when_nothing_listens(closed_address: str) -> None:
    # Execute
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="UNAVAILABLE"):
        wait_healthy(closed_address, timeout=1.0, interval=0.2)
    elapsed = time.monotonic() - start

    # Assert
    assert 1.0 <= elapsed < 3.0


def test_unreachable_is_a_health_check_error() -> None:
    # Assert: callers that catch HealthCheckError also catch unreachable servers
    assert issubclass(HealthUnreachableError, HealthCheckError)


@pytest.mark.parametrize("address", ["nonsense", "host:", ":9000", "host:0", "host:70000", ""])
def test_bad_addresses_raise(address: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=f"address={address!r}"):
        check_health(address)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_bad_timeouts_raise(timeout: float) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="timeout="):
        check_health("127.0.0.1:9", timeout=timeout)


def test_an_unreadable_or_non_pem_ca_raises(tmp_path: Path) -> None:
    # Prepare
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate")

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot read"):
        check_health("127.0.0.1:9", tls_ca=tmp_path / "missing.crt")
    with pytest.raises(ValueError, match="not a PEM certificate"):
        check_health("127.0.0.1:9", tls_ca=junk)


def test_main_exits_2_on_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = main(["nonsense"])

    # Assert
    assert code == 2
    assert "'nonsense'" in capsys.readouterr().err
