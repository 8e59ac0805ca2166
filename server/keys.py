"""TLS certificates and SuperNode keys for a Flower deployment (``fedpriv keys``).

One call writes everything a SuperLink and its SuperNodes need::

    OUT/ca.crt                  CA certificate (PEM): every SuperNode's --root-certificates
    OUT/ca.key                  CA private key (PEM): keep it offline once the certs are made
    OUT/server.crt, server.key  SuperLink TLS certificate and key (PEM, EC P-384)
    OUT/sites/NAME/auth.key     SuperNode authentication key (ECDSA P-384, OpenSSH)
    OUT/sites/NAME/auth.pub     its public key, for ``flwr supernode register``

The formats are the ones Flower 1.42 reads: the SuperLink hands ``--ssl-certfile``
and ``--ssl-keyfile`` to uvicorn (Python's ``ssl``) and ``--ssl-ca-certfile`` to its
own runtime clients; a SuperNode checks the server with ``ssl`` against
``--root-certificates``, host name included, so the server certificate names every
host the SuperNodes dial. ``flower-supernode --auth-supernode-private-key`` loads
the key with ``load_ssh_private_key`` and ``flwr supernode register`` the public
key with ``load_ssh_public_key``; both want a NIST curve.

Private keys are created mode 0600 (never readable by others, not even while
being written) and key folders 0700. Existing files are never replaced unless
asked: the check runs before anything is written, and a failure while writing
removes what this call wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["KeyExistsError", "KeySet", "make_keys", "main"]

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MAX_DAYS = 36525  # 100 years; past that the dates are a typo, not a plan
_CLOCK_SKEW = dt.timedelta(minutes=5)  # peers whose clocks run a little behind
_PRIVATE, _PUBLIC = 0o600, 0o644


class KeyExistsError(FileExistsError):
    """Some of the files ``make_keys`` would write already exist.

    Attributes
    ----------
    paths : tuple of Path
        The existing files, in the order they would have been written.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        listing = ", ".join(str(p) for p in self.paths)
        super().__init__(
            f"refusing to overwrite {len(self.paths)} existing file(s): {listing}; "
            "nothing was written (pass overwrite=True, or --force, to replace them)"
        )


@dataclass(frozen=True)
class KeySet:
    """Where ``make_keys`` wrote each file.

    Attributes
    ----------
    ca_cert, ca_key : Path
        The CA certificate (PEM) and its private key (PEM, PKCS#8).
    server_cert, server_key : Path
        The SuperLink's TLS certificate (PEM) and private key (PEM, PKCS#8).
    site_keys : dict of str to (Path, Path)
        Per site name, its SuperNode key pair: (private OpenSSH key, public key line).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]

    @classmethod
    def at(cls, out: Path, sites: Sequence[str]) -> KeySet:
        """The paths of a key set under ``out`` (nothing is read or written)."""
        return cls(
            ca_cert=out / "ca.crt",
            ca_key=out / "ca.key",
            server_cert=out / "server.crt",
            server_key=out / "server.key",
            site_keys={
                s: (out / "sites" / s / "auth.key", out / "sites" / s / "auth.pub") for s in sites
            },
        )

    def files(self) -> list[Path]:
        """Every file of the set, CA first."""
        paths = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        for private, public in self.site_keys.values():
            paths += [private, public]
        return paths


def _check_sites(sites: Sequence[str]) -> list[str]:
    if isinstance(sites, str):
        raise ValueError(f"sites={sites!r}: give a sequence of names, not one string")
    names = list(sites)
    if not names:
        raise ValueError("sites=[]: give at least one site name")
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
            raise ValueError(
                f"site name {name!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        # Case-insensitive file systems (macOS, Windows) would put both in one folder.
        if name.lower() in seen:
            raise ValueError(f"site name {name!r} repeats {seen[name.lower()]!r}")
        seen[name.lower()] = name
    return names


def _check_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str):
        raise ValueError(f"hosts={hosts!r}: give a sequence of host names, not one string")
    if not hosts:
        raise ValueError("hosts=[]: give at least one host name or IP address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host {host!r}: give a DNS name or an IP address")
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            labels = host.rstrip(".").split(".")
            # An all-digit last label is a mistyped IP address (no top-level domain is).
            if (
                len(host) > 253
                or not all(_DNS_LABEL.fullmatch(x) for x in labels)
                or labels[-1].isdigit()
            ):
                raise ValueError(f"host {host!r} is neither an IP address nor a DNS name") from None
            name = x509.DNSName(host.rstrip(".").lower())
        if name in names:
            raise ValueError(f"host {host!r} is given twice")
        names.append(name)
    return names


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificates(hosts: list[x509.GeneralName], days: int) -> tuple[bytes, bytes, bytes, bytes]:
    """Return (ca.crt, ca.key, server.crt, server.key), all PEM."""
    now = dt.datetime.now(dt.UTC)
    start, end = now - _CLOCK_SKEW, now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpriv CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    first = hosts[0].value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(hosts), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return (
        ca_cert.public_bytes(pem),
        _pkcs8(ca_key),
        server_cert.public_bytes(pem),
        _pkcs8(server_key),
    )


def _site_pair(site: str) -> tuple[bytes, bytes]:
    """Return an ECDSA P-384 pair as (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" fedpriv-{site}\n".encode()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``mode`` from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _commit(files: list[tuple[Path, bytes, int]]) -> None:
    """Write every file or none: stage each beside its target, then rename them in.

    Folders this call creates are made 0700 and removed again if staging fails.
    """
    made: list[Path] = []
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            for folder in reversed([path.parent, *path.parent.parents]):
                if not folder.exists():
                    folder.mkdir(mode=0o700)
                    made.append(folder)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            _write_new(tmp, data, mode)
            staged.append((tmp, path))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:  # after a failed rename, leave no staged copies of private keys behind
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def make_keys(
    out: Path,
    sites: Sequence[str],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
    overwrite: bool = False,
) -> KeySet:
    """Make a CA, a SuperLink TLS certificate and one SuperNode key pair per site.

    Parameters
    ----------
    out : Path
        Folder to write into (made, mode 0700, if missing).
    sites : sequence of str
        Site names, unique (ignoring case), of letters, digits, ``.``, ``_``, ``-``,
        starting with a letter or digit. Each gets ``sites/NAME/auth.key`` and ``.pub``.
    hosts : sequence of str
        Names the SuperNodes use to reach the SuperLink: IP addresses become
        IP subjectAltNames, the rest DNS ones. TLS clients refuse any other name.
    days : int
        Validity of the CA and server certificates, from now (1 to 36525).
    overwrite : bool
        Replace existing files. When False and any target exists, nothing is written.

    Returns
    -------
    KeySet
        The paths written.

    Raises
    ------
    ValueError
        A site name, host or ``days`` is invalid, or ``out`` is not a folder.
    KeyExistsError
        ``overwrite`` is False and some target files exist (all are listed).
    """
    out = Path(out)
    names = _check_sites(sites)
    san = _check_hosts(hosts)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise ValueError(f"days={days!r}: must be a whole number from 1 to {_MAX_DAYS}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} exists and is not a folder")
    keyset = KeySet.at(out, names)
    existing = [p for p in keyset.files() if os.path.lexists(p)]
    if existing and not overwrite:
        raise KeyExistsError(existing)

    ca_crt, ca_key, server_crt, server_key = _certificates(san, days)
    files = [
        (keyset.ca_cert, ca_crt, _PUBLIC),
        (keyset.ca_key, ca_key, _PRIVATE),
        (keyset.server_cert, server_crt, _PUBLIC),
        (keyset.server_key, server_key, _PRIVATE),
    ]
    for site, (private_path, public_path) in keyset.site_keys.items():
        private, public = _site_pair(site)
        files += [(private_path, private, _PRIVATE), (public_path, public, _PUBLIC)]
    _commit(files)
    return keyset


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpriv keys",
        description="Make a CA, the SuperLink's TLS certificate and one SuperNode "
        "authentication key pair per site.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument("--sites", required=True, help="comma-separated site names")
    p.add_argument(
        "--hosts",
        default="127.0.0.1,localhost",
        help="comma-separated names and IPs SuperNodes dial (default: 127.0.0.1,localhost)",
    )
    p.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    return p


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    """``fedpriv keys``: exit 0 when written, 2 (with a one-line reason) otherwise."""
    args = _parser().parse_args(None if argv is None else list(argv))
    try:
        keys = make_keys(
            args.out.expanduser(),
            _split(args.sites),
            hosts=_split(args.hosts),
            days=args.days,
            overwrite=args.force,
        )
    except (ValueError, OSError) as ex:  # KeyExistsError is an OSError
        print(f"fedpriv keys: {ex}", file=sys.stderr)
        return 2
    print(f"fedpriv keys: wrote {len(keys.files())} files under {args.out}")
    for path in keys.files():
        print(f"  {path}")
    print(
        "SuperLink: flower-superlink "
        f"--ssl-ca-certfile {keys.ca_cert} --ssl-certfile {keys.server_cert} "
        f"--ssl-keyfile {keys.server_key} --enable-supernode-auth"
    )
    for site, (private, public) in keys.site_keys.items():
        print(
            f"{site}: flwr supernode register {public} CONNECTION; then flower-supernode "
            f"--root-certificates {keys.ca_cert} --auth-supernode-private-key {private} ..."
        )
    print(f"keep {keys.ca_key} offline: whoever holds it can impersonate the SuperLink")
    return 0
