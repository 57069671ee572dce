"""Make the TLS certificates and SuperNode keys of a deployment with SuperNode authentication.

    python -m sim.certs DIR [--nodes 4] [--host 127.0.0.1 --host localhost --host aggregator.example.org]

writes into DIR (0700):

- ``ca.crt`` / ``ca.key``: a certificate authority made for this federation (keep ``ca.key`` offline);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for every
  ``--host`` (the names and addresses SuperNodes and the ``flwr`` CLI use to reach the SuperLink);
- ``E1.key`` / ``E1.pub`` ... : one P-384 key pair per SuperNode in OpenSSH format, the form
  ``flwr supernode register`` (public) and ``flower-supernode --auth-supernode-private-key`` (private) read.

Private keys are 0600. For a loopback trial the defaults fit; on real machines each organisation should
make its own SuperNode key pair on its own machine and hand over only the ``.pub`` file (``--nodes 0``
makes the CA and server certificate alone; ``--node-key NAME`` one key pair).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from entities.files import make_dir, write_bytes
from sim.help import DefaultsHelp

DAYS = 365


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "poisonpool federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("poisonpool CA")).issuer_name(_name("poisonpool CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    write_bytes(out / "ca.key", _pem_key(key, serialization.PrivateFormat.PKCS8), private=True)
    write_bytes(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(out: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, hosts: list[str]) -> None:
    """The SuperLink's certificate: signed by the CA, for every name or address in ``hosts``."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write_bytes(out / "server.key", _pem_key(key, serialization.PrivateFormat.PKCS8), private=True)
    write_bytes(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(out: Path, name: str) -> Path:
    """``<name>.key`` (OpenSSH private, 0600) and ``<name>.pub`` (OpenSSH public); returns the .pub path."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_bytes(out / f"{name}.key", _pem_key(key, serialization.PrivateFormat.OpenSSH), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return write_bytes(out / f"{name}.pub", public + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.certs", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelp)
    parser.add_argument("out", type=Path, help="folder for the certificates and keys (created 0700)")
    parser.add_argument("--host", action="append", default=None,
                        help="a name or address the SuperLink is reached at (repeatable; default 127.0.0.1, localhost)")
    parser.add_argument("--nodes", type=int, default=4, help="SuperNode key pairs E1..En to make")
    parser.add_argument("--node-key", default=None, metavar="NAME", help="make only the key pair NAME.key/NAME.pub")
    args = parser.parse_args(argv)
    out = make_dir(args.out, private=True)
    if args.node_key:
        print(make_node_key(out, args.node_key))
        return 0
    if args.nodes < 0:
        parser.error("--nodes must be >= 0")
    ca_key, ca = make_ca(out)
    make_server_cert(out, ca_key, ca, args.host or ["127.0.0.1", "localhost"])
    for k in range(args.nodes):
        make_node_key(out, f"E{k + 1}")
    print(f"wrote ca.crt, server.pem, server.key and {args.nodes} SuperNode key pair(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
