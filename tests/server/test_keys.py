"""``server.keys``: the CA, the SuperLink certificate and the SuperNode keys.

Files are checked with ``cryptography`` (signatures, extensions, its own X.509
path validator), with Flower's own key loaders, and over real TLS: a grpc health
server using ``server.crt``/``server.key`` and, in the slow tests, a real
``flower-superlink`` with ``--enable-supernode-auth`` and real ``flower-supernode``s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.health import HealthUnreachableError, check_health, wait_healthy
from server.keys import KeyExistsError, KeySet, main, make_keys

HOSTS = ("127.0.0.1", "localhost", "fl.example.org", "::1")
BIN = Path(sys.executable).parent


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _private_files(keys: KeySet) -> list[Path]:
    return [keys.ca_key, keys.server_key, *(k for k, _ in keys.site_keys.values())]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- certificates ---------------------------------------------------------------


def test_server_certificate_is_signed_by_the_ca_and_names_every_host(tmp_path: Path) -> None:
    # Prepare / Execute
    keys = make_keys(tmp_path, ["site-a"], hosts=HOSTS)
    ca, server = _cert(keys.ca_cert), _cert(keys.server_cert)

    # Assert: the CA's public key checks the server certificate's signature
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    assert server.signature_hash_algorithm is not None
    ca_public.verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    assert server.issuer == ca.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    server_key = serialization.load_pem_private_key(keys.server_key.read_bytes(), None)
    assert server_key.public_key() == server.public_key()


def test_ca_is_a_self_signed_certificate_authority(tmp_path: Path) -> None:
    # Prepare / Execute
    keys = make_keys(tmp_path, ["site-a"])
    ca = _cert(keys.ca_cert)

    # Assert
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)  # its own key signed it
    ca_key = serialization.load_pem_private_key(keys.ca_key.read_bytes(), None)
    assert ca_key.public_key() == ca.public_key()


def test_certificates_are_valid_for_the_given_days(tmp_path: Path) -> None:
    # Prepare: X.509 times have whole seconds
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)

    # Execute
    keys = make_keys(tmp_path, ["site-a"], days=30)
    after = dt.datetime.now(dt.UTC)

    # Assert: valid already, and until 30 days after the call
    for cert in (_cert(keys.ca_cert), _cert(keys.server_cert)):
        assert cert.not_valid_before_utc <= before
        assert before + dt.timedelta(days=30) <= cert.not_valid_after_utc
        assert cert.not_valid_after_utc <= after + dt.timedelta(days=30)


@pytest.mark.parametrize(
    "name",
    [
        verification.DNSName("localhost"),
        verification.DNSName("fl.example.org"),
        verification.IPAddress(ipaddress.ip_address("127.0.0.1")),
        verification.IPAddress(ipaddress.ip_address("::1")),
    ],
)
def test_an_x509_path_validator_accepts_the_server_for_each_host(
    tmp_path: Path, name: verification.DNSName | verification.IPAddress
) -> None:
    # Prepare: cryptography's own web-PKI validator, trusting only our CA
    keys = make_keys(tmp_path, ["site-a"], hosts=HOSTS)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([_cert(keys.ca_cert)]))
        .build_server_verifier(name)
    )

    # Execute
    chain = verifier.verify(_cert(keys.server_cert), [])

    # Assert
    assert chain[-1] == _cert(keys.ca_cert)


def test_an_x509_path_validator_refuses_a_host_not_named(tmp_path: Path) -> None:
    # Prepare
    keys = make_keys(tmp_path, ["site-a"], hosts=HOSTS)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([_cert(keys.ca_cert)]))
        .build_server_verifier(verification.DNSName("other.example.org"))
    )

    # Execute / Assert
    with pytest.raises(verification.VerificationError):
        verifier.verify(_cert(keys.server_cert), [])


# --- SuperNode keys -------------------------------------------------------------


def test_site_keys_are_matching_p384_openssh_pairs(tmp_path: Path) -> None:
    # Prepare / Execute
    keys = make_keys(tmp_path, ["site-a", "site-b"])

    # Assert
    assert set(keys.site_keys) == {"site-a", "site-b"}
    publics = []
    for site, (private_path, public_path) in keys.site_keys.items():
        assert private_path == tmp_path / "sites" / site / "auth.key"
        assert public_path == tmp_path / "sites" / site / "auth.pub"
        private_bytes = private_path.read_bytes()
        assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert public_path.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
        private = serialization.load_ssh_private_key(private_bytes, password=None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        publics.append(public.public_numbers())
    assert publics[0] != publics[1]


def test_flowers_own_loaders_accept_the_site_keys(tmp_path: Path) -> None:
    # Prepare: the functions flwr 1.42 runs for `flwr supernode register PUB` and
    # `flower-supernode --auth-supernode-private-key KEY`
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    keys = make_keys(tmp_path, ["site-a"])
    private_path, public_path = keys.site_keys["site-a"]

    # Execute
    registered = try_load_public_key(public_path)
    pair = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(private_path), auth_supernode_public_key=None
        )
    )

    # Assert: the key the SuperNode signs with is the one registered
    assert pair is not None
    assert public_key_to_bytes(pair[1]) == registered


# --- files: modes, no overwrite, all or nothing ------------------------------------


def test_private_keys_are_0600_and_key_folders_0700(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "keys"

    # Execute
    keys = make_keys(out, ["site-a", "site-b"])

    # Assert
    for path in _private_files(keys):
        assert _mode(path) == 0o600, path
    for folder in (out, out / "sites", out / "sites" / "site-a", out / "sites" / "site-b"):
        assert _mode(folder) == 0o700, folder
    assert len(keys.files()) == 8 and all(p.is_file() for p in keys.files())


def test_private_keys_are_created_0600_never_wider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record how every file is created
    real_open = os.open
    created: list[tuple[str, int, int]] = []

    def spy(path: str, flags: int, mode: int = 0o777, *args: object, **kw: object) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)

    # Execute
    keys = make_keys(tmp_path, ["site-a"])

    # Assert: a fresh file (O_EXCL) born 0600 per private key, renamed into place
    monkeypatch.undo()
    private_names = {p.name for p in _private_files(keys)}
    for name in private_names:
        births = [c for c in created if Path(c[0]).name.startswith(f".{name}.")]
        assert len(births) == 1, name
        _, flags, mode = births[0]
        assert flags & os.O_EXCL and mode == 0o600, (name, oct(mode))
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_second_call_refuses_and_leaves_every_file_as_it_was(tmp_path: Path) -> None:
    # Prepare
    keys = make_keys(tmp_path, ["site-a", "site-b"])
    before = _tree(tmp_path)

    # Execute
    with pytest.raises(KeyExistsError) as caught:
        make_keys(tmp_path, ["site-a", "site-b"])

    # Assert
    assert caught.value.paths == tuple(keys.files())
    assert str(keys.ca_key) in str(caught.value)
    assert _tree(tmp_path) == before


def test_one_existing_file_blocks_all_writes(tmp_path: Path) -> None:
    # Prepare: only site-b's public key is there
    existing = tmp_path / "sites" / "site-b" / "auth.pub"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"mine")

    # Execute
    with pytest.raises(KeyExistsError) as caught:
        make_keys(tmp_path, ["site-a", "site-b"])

    # Assert
    assert caught.value.paths == (existing,)
    assert _tree(tmp_path) == {"sites/site-b/auth.pub": b"mine"}
    assert not (tmp_path / "sites" / "site-a").exists()


def test_overwrite_replaces_every_file_and_tightens_modes(tmp_path: Path) -> None:
    # Prepare: a first set, with one private key left world-readable by someone
    keys = make_keys(tmp_path, ["site-a"])
    before = _tree(tmp_path)
    os.chmod(keys.server_key, 0o644)

    # Execute
    again = make_keys(tmp_path, ["site-a"], overwrite=True)

    # Assert: fresh keys (random, so every byte string differs), private ones 0600
    after = _tree(tmp_path)
    assert again == keys
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)
    for path in _private_files(again):
        assert _mode(path) == 0o600, path


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".", "..", "-x", "a b", "é", ".hidden"])
def test_bad_site_names_raise_and_write_nothing(tmp_path: Path, name: str) -> None:
    # Prepare
    out = tmp_path / "keys"

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        make_keys(out, ["site-a", name])
    assert not out.exists()


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        (["site-a", "site-a"], "repeats"),
        (["Site-A", "site-a"], "repeats"),
        ([], "at least one"),
        ("site-a", "not one string"),
    ],
)
def test_repeated_missing_or_unsplit_sites_raise(
    tmp_path: Path, sites: list[str], message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        make_keys(tmp_path / "keys", sites)


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ([], "at least one"),
        ("localhost", "not one string"),
        ([""], "''"),
        (["bad host"], "'bad host'"),
        (["1.2.3.999"], "'1.2.3.999'"),
        (["-a.example.org"], "'-a.example.org'"),
        (["localhost", "LOCALHOST"], "twice"),
    ],
)
def test_bad_hosts_raise(tmp_path: Path, hosts: list[str], message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)):
        make_keys(tmp_path / "keys", ["site-a"], hosts=hosts)


@pytest.mark.parametrize("days", [0, -1, 1.5, True, 10**6])
def test_bad_days_raise(tmp_path: Path, days: int) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(f"days={days!r}")):
        make_keys(tmp_path / "keys", ["site-a"], days=days)


def test_main_writes_refuses_then_forces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    argv = ["--out", str(tmp_path), "--sites", "site-a, site-b", "--hosts", "10.0.0.5,fl.lan"]

    # Execute
    first = main(argv)
    first_out = capsys.readouterr().out
    before = _tree(tmp_path)
    second = main(argv)
    second_err = capsys.readouterr().err
    third = main([*argv, "--force"])

    # Assert
    assert first == 0 and second == 2 and third == 0
    assert str(tmp_path / "sites" / "site-b" / "auth.key") in first_out
    assert "flwr supernode register" in first_out
    assert "refusing to overwrite 8 existing file(s)" in second_err
    assert len(second_err.strip().splitlines()) == 1
    assert _tree(tmp_path) != before
    san = _cert(tmp_path / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["fl.lan"]


def test_main_exits_2_on_a_bad_site_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main(["--out", str(tmp_path / "k"), "--sites", "ok,no/slash"])

    # Assert
    assert code == 2
    assert "'no/slash'" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


# --- real TLS: a grpc health server on the generated files -------------------------


@contextmanager
def _tls_health_server(keys: KeySet) -> Iterator[int]:
    """A grpc health server (SERVING) on 127.0.0.1 using ``server.key/crt``; yields its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(keys.server_key.read_bytes(), keys.server_cert.read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def test_tls_health_check_succeeds_with_our_ca(tmp_path: Path) -> None:
    # Prepare
    keys = make_keys(tmp_path, ["site-a"])

    with _tls_health_server(keys) as port:
        # Execute
        status = check_health(f"127.0.0.1:{port}", timeout=10, tls_ca=keys.ca_cert)

    # Assert
    assert status == "SERVING"


def test_tls_health_check_fails_with_a_different_ca(tmp_path: Path) -> None:
    # Prepare
    keys = make_keys(tmp_path / "ours", ["site-a"])
    other = make_keys(tmp_path / "other", ["site-a"])

    with _tls_health_server(keys) as port:
        # Execute / Assert
        with pytest.raises(HealthUnreachableError, match="UNAVAILABLE"):
            check_health(f"127.0.0.1:{port}", timeout=10, tls_ca=other.ca_cert)


def test_tls_health_check_fails_for_a_host_the_certificate_does_not_name(
    tmp_path: Path,
) -> None:
    # Prepare: a certificate for "localhost" only, dialled by IP
    keys = make_keys(tmp_path, ["site-a"], hosts=["localhost"])

    with _tls_health_server(keys) as port:
        # Execute / Assert
        with pytest.raises(HealthUnreachableError):
            check_health(f"127.0.0.1:{port}", timeout=10, tls_ca=keys.ca_cert)


# --- slow: a real SuperLink with TLS and SuperNode authentication --------------------


@contextmanager
def _process(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` in its own process group; stop that group (ours alone) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@dataclass(frozen=True)
class _SuperLink:
    keys: KeySet
    port: int  # HTTPS: Fleet, Control and Runtime APIs
    health: str  # HOST:PORT of the plaintext gRPC health service
    env: dict[str, str]  # FLWR_HOME holds the connection "fedpriv" to it
    root: Path


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SuperLink]:
    """flower-superlink with TLS from ``make_keys`` and SuperNode auth, on free ports."""
    root = tmp_path_factory.mktemp("superlink")
    keys = make_keys(root / "keys", ["site-a", "site-b"])
    port, health_port = _free_port(), _free_port()
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedpriv"\n\n[superlink.fedpriv]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{keys.ca_cert}"\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home)}
    args = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(keys.ca_cert),
        "--ssl-certfile", str(keys.server_cert),
        "--ssl-keyfile", str(keys.server_key),
        "--enable-supernode-auth",
        "--isolation", "process",  # no SuperExec child: this test runs no app
        "--port", str(port),
        "--health-server-address", f"127.0.0.1:{health_port}",
    ]  # fmt: skip
    with _process(args, root / "superlink.log", env):
        try:
            wait_healthy(f"127.0.0.1:{health_port}", timeout=90, interval=0.2)
        except TimeoutError as ex:
            pytest.fail(f"{ex}\n{(root / 'superlink.log').read_text()[-3000:]}")
        yield _SuperLink(keys, port, f"127.0.0.1:{health_port}", env, root)


@pytest.mark.slow
def test_superlink_with_our_files_is_healthy_and_serves_https(superlink: _SuperLink) -> None:
    # Prepare
    keys, port = superlink.keys, superlink.port
    other = make_keys(superlink.root / "other", ["x"])
    ours = ssl.create_default_context(cafile=str(keys.ca_cert))
    theirs = ssl.create_default_context(cafile=str(other.ca_cert))

    # Execute
    status = check_health(superlink.health, timeout=10)
    replies = [
        httpx.get(f"https://{h}:{port}/", verify=ours, timeout=10)
        for h in ("127.0.0.1", "localhost")
    ]

    # Assert: HTTP answers (any status) prove the TLS handshake with our CA worked
    assert status == "SERVING"
    assert all(r.status_code < 600 for r in replies)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{port}/", verify=theirs, timeout=10)


def _flwr_nodes(env: dict[str, str]) -> list[dict[str, object]]:
    done = subprocess.run(
        [str(BIN / "flwr"), "supernode", "ls", "--format", "json"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    nodes: list[dict[str, object]] = json.loads(done.stdout)["nodes"]
    return nodes


@pytest.mark.slow
def test_registered_site_connects_and_unregistered_site_is_refused(
    superlink: _SuperLink,
) -> None:
    # Prepare: register site-a's public key through TLS with `flwr supernode register`
    keys, env, root = superlink.keys, superlink.env, superlink.root
    register = subprocess.run(
        [str(BIN / "flwr"), "supernode", "register", str(keys.site_keys["site-a"][1]),
         "--format", "json"],
        env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert register.returncode == 0, register.stderr.decode()
    node_id = json.loads(register.stdout)["node-id"]

    def supernode(site: str) -> list[str]:
        return [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{superlink.port}",
            "--root-certificates", str(keys.ca_cert),
            "--auth-supernode-private-key", str(keys.site_keys[site][0]),
            "--isolation", "process",
            "--port", str(_free_port()),
            "--max-retries", "1",
        ]  # fmt: skip

    # Execute
    with (
        _process(supernode("site-a"), root / "site-a.log", env),
        _process(supernode("site-b"), root / "site-b.log", env) as site_b,
    ):
        refused = site_b.wait(timeout=90)
        deadline, nodes = time.monotonic() + 60, _flwr_nodes(env)
        while nodes[0]["status"] != "online" and time.monotonic() < deadline:
            time.sleep(1)
            nodes = _flwr_nodes(env)

    # Assert
    assert refused != 0
    assert "Failed to activate SuperNode" in (root / "site-b.log").read_text()
    assert [(int(str(n["node-id"])), n["status"]) for n in nodes] == [(node_id, "online")]
