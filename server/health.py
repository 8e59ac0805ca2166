"""Ask a gRPC health service whether it is serving (``fedpriv health HOST:PORT``).

``flower-superlink --health-server-address HOST:PORT`` serves the standard
``grpc.health.v1.Health`` service there, without TLS (Flower 1.42 starts it with
no certificates whatever the other APIs use), and answers SERVING while the
process is up. ``tls_ca`` is for health services that do run TLS.

Exit status of ``main``: 0 when the service answers SERVING, 1 when it answers
anything else (NOT_SERVING, or an error such as an unknown service), 2 when it
cannot be reached in time or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = [
    "HealthCheckError",
    "HealthUnreachableError",
    "check_health",
    "main",
    "wait_healthy",
]

# The codes a call gets when no server answered: refused, TLS failure, deadline.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class HealthCheckError(RuntimeError):
    """The health service did not answer with a status.

    Attributes
    ----------
    address : str
        The address asked.
    code : grpc.StatusCode
        The gRPC status of the failed call.
    """

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        self.address = address
        self.code = code
        super().__init__(f"{address}: {code.name}: {details}")


class HealthUnreachableError(HealthCheckError):
    """Nothing answered at the address in time (refused, TLS failure or deadline)."""


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address={address!r}: expected HOST:PORT, e.g. 127.0.0.1:9098")
    return address


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r}: must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive, finite number of seconds")


def _read_ca(tls_ca: Path) -> bytes:
    try:
        pem = Path(tls_ca).read_bytes()
        x509.load_pem_x509_certificates(pem)
    except OSError as ex:
        raise ValueError(f"tls_ca={str(tls_ca)!r}: cannot read it: {ex.strerror}") from ex
    except ValueError as ex:
        raise ValueError(f"tls_ca={str(tls_ca)!r}: not a PEM certificate: {ex}") from ex
    return pem


def check_health(
    address: str,
    *,
    timeout: float = 5.0,
    service: str = "",
    tls_ca: Path | None = None,
) -> str:
    """Ask the gRPC health service at ``address`` for a service's status.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` (``[IPV6]:PORT`` for IPv6 literals).
    timeout : float
        Seconds before the call gives up (connection and answer together).
    service : str
        The service to ask about; ``""`` asks about the server as a whole.
    tls_ca : Path or None
        PEM CA certificate to verify the server with; None for a plaintext channel.
        With TLS the server certificate must name the host in ``address``.

    Returns
    -------
    str
        The status name: ``"SERVING"``, ``"NOT_SERVING"``, ``"UNKNOWN"``, ...

    Raises
    ------
    ValueError
        ``address``, ``timeout`` or ``tls_ca`` is invalid.
    HealthUnreachableError
        Nothing answered in time: connection refused, TLS handshake failed, deadline.
    HealthCheckError
        The server answered the call with an error (no health service, unknown service).
    """
    target = _check_address(address)
    _check_seconds("timeout", timeout)
    if tls_ca is None:
        channel = grpc.insecure_channel(target)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=_read_ca(tls_ca))
        channel = grpc.secure_channel(target, credentials)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as ex:
        code: grpc.StatusCode = ex.code()  # every RpcError raised by a call is a grpc.Call
        error = HealthUnreachableError if code in _UNREACHABLE else HealthCheckError
        raise error(address, code, ex.details() or "no details") from None
    finally:
        channel.close()
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_healthy(
    address: str,
    *,
    timeout: float,
    interval: float = 0.5,
    service: str = "",
    tls_ca: Path | None = None,
) -> None:
    """Ask ``address`` every ``interval`` seconds until it answers SERVING.

    Parameters
    ----------
    address, service, tls_ca
        As for ``check_health``.
    timeout : float
        Seconds to keep trying; no call outlives it.
    interval : float
        Seconds between attempts.

    Raises
    ------
    ValueError
        An argument is invalid.
    TimeoutError
        It was not SERVING within ``timeout``; the message gives the last answer.
    """
    _check_address(address)
    _check_seconds("timeout", timeout)
    _check_seconds("interval", interval)
    if tls_ca is not None:
        _read_ca(tls_ca)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            status = check_health(address, timeout=remaining, service=service, tls_ca=tls_ca)
        except HealthCheckError as ex:
            last = str(ex)
        else:
            if status == "SERVING":
                return
            last = f"{address}: {status}"
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    raise TimeoutError(f"{address} not SERVING after {timeout:g} s; last: {last}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpriv health",
        description="Ask a gRPC health service (e.g. flower-superlink "
        "--health-server-address) whether it is SERVING. Exit 0 if it is, 1 if it "
        "answers otherwise, 2 if it cannot be reached.",
    )
    p.add_argument("address", help="HOST:PORT of the health service")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM CA, for a TLS health service")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``fedpriv health``: print one line and return 0, 1 or 2 (see the module doc)."""
    args = _parser().parse_args(None if argv is None else list(argv))
    try:
        status = check_health(
            args.address, timeout=args.timeout, service=args.service, tls_ca=args.tls_ca
        )
    except ValueError as ex:
        print(f"fedpriv health: {ex}", file=sys.stderr)
        return 2
    except HealthUnreachableError as ex:
        print(f"fedpriv health: unreachable: {ex}", file=sys.stderr)
        return 2
    except HealthCheckError as ex:
        print(f"fedpriv health: {ex}", file=sys.stderr)
        return 1
    print(f"fedpriv health: {args.address}: {status}")
    return 0 if status == "SERVING" else 1
