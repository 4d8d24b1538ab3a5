"""TLS and SuperNode-authentication credentials for a FedCap deployment.

    python -m deploy.credentials OUT --host superlink.example.org --host 10.0.0.5 --site site-0 --site site-1

writes into OUT:
  ca.crt, ca.key           a private certificate authority (keep ca.key offline in production)
  server.pem, server.key   the SuperLink's TLS certificate, signed by the CA, with every --host as a
                           subject alternative name (a SuperNode checks the name it dials against it)
  <site>/site.key, <site>/site.pub   each site's ECDSA P-384 key pair in OpenSSH format: the private
                           key stays at the site (`flower-supernode --auth-supernode-private-key`),
                           the public key is registered at the SuperLink (`flwr supernode register`)

Existing files are never overwritten: delete them yourself to rotate credentials.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _write_new(path: Path, data: bytes, *, private: bool = False) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; delete it to make new credentials")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _certificate(subject: str, key, *, issuer: x509.Name | None, issuer_key, ca: bool,
                 hosts: list[str] = ()) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        builder = (builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls(out: str | Path, hosts: list[str]) -> dict[str, Path]:
    """A CA and a server certificate valid for `hosts` (IP addresses or DNS names)."""
    if not hosts:
        raise ValueError("give at least one --host: the address the SuperNodes and flwr will dial")
    for h in hosts:
        if not h or any(c.isspace() for c in h) or ":" in h and not _is_ip(h):
            raise ValueError(f"--host must be an IP address or a DNS name without port, got {h!r}")
    out = Path(out)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("FedCap federation CA", ca_key, issuer=None, issuer_key=ca_key, ca=True)
    server = _certificate(hosts[0], server_key, issuer=ca.subject, issuer_key=ca_key, ca=False, hosts=hosts)
    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key", "server_cert": out / "server.pem",
             "server_key": out / "server.key"}
    for p in paths.values():
        if p.exists():
            raise FileExistsError(f"{p} exists; delete it to make new credentials")
    _write_new(paths["ca_key"], _pem_key(ca_key), private=True)
    _write_new(paths["ca_cert"], ca.public_bytes(serialization.Encoding.PEM))
    _write_new(paths["server_key"], _pem_key(server_key), private=True)
    _write_new(paths["server_cert"], server.public_bytes(serialization.Encoding.PEM))
    return paths


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def make_site_key(out: str | Path, site: str) -> tuple[Path, Path]:
    """A site's authentication key pair (ECDSA P-384, OpenSSH format, as flower-supernode reads it)."""
    if not site or "/" in site or site.startswith("."):
        raise ValueError(f"site name must be a plain folder name, got {site!r}")
    folder = Path(out) / site
    private, public = folder / "site.key", folder / "site.pub"
    key = ec.generate_private_key(ec.SECP384R1())
    _write_new(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), private=True)
    _write_new(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {site}\n".encode())
    return private, public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.credentials", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the credentials")
    parser.add_argument("--host", action="append", default=[], help="SuperLink address for the certificate (repeat)")
    parser.add_argument("--site", action="append", default=[], help="make a key pair for this site (repeat)")
    args = parser.parse_args(argv)
    try:
        if args.host:
            for p in make_tls(args.out, args.host).values():
                print(p)
        for site in args.site:
            for p in make_site_key(args.out, site):
                print(p)
    except (ValueError, FileExistsError) as e:
        print(f"deploy.credentials: error: {e}", file=sys.stderr)
        return 2
    if not args.host and not args.site:
        parser.error("nothing to do: give --host and/or --site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
