"""Certificates for the secured local stack (`probe stack up --secure`).

Two small private CAs: one for the stores (Redis and MariaDB server certificates,
and a client certificate probe presents to them) and one for RPC between
consumers and providers (`rpc_tls.<env>`), so a certificate that opens Redis does
not also let its holder call providers. Keys are EC P-256, written 0600.

For development and tests only: a real fleet gets its certificates from its own
PKI. Made with the `cryptography` package.
"""

import datetime
import ipaddress
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

from ..errors import ProbeError

VALID_DAYS = 825  # the longest lifetime TLS clients accept for a leaf


class CertPair(NamedTuple):
    cert: str
    key: str


class StackCerts(NamedTuple):
    """PEM paths of the secured stack."""
    ca: str                 # CA of the stores' certificates
    server: CertPair        # Redis and MariaDB, for the stack's host
    client: CertPair        # what probe presents to Redis and MariaDB
    rpc_ca: str             # CA of RPC certificates
    rpc_provider: CertPair  # a provider's
    rpc_consumer: CertPair  # a consumer's


def _crypto() -> Tuple[Any, Any, Any, Any, Any, Any]:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ProbeError("making certificates needs the 'cryptography' package: "
                         "pip install cryptography")
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write(path: str, data: bytes, private: bool = False) -> None:
    temporary = path + ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    handle = os.open(temporary, flags, 0o600 if private else 0o644)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


class _Authority(object):
    """A CA key and certificate that signs leaves."""

    def __init__(self, common_name: str) -> None:
        x509, hashes, serialization, ec, _, NameOID = _crypto()
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = name
        self.cert = (x509.CertificateBuilder()
                     .subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=True, key_cert_sign=True, crl_sign=True,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, common_name: str, server_host: Optional[str] = None,
              client: bool = False) -> Tuple[bytes, bytes]:
        """(cert PEM, key PEM) of a leaf: a server certificate for `server_host` (an
        IP or a name, in the SAN), and/or a client certificate."""
        x509, hashes, serialization, ec, EKU, NameOID = _crypto()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usages = []
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.name)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server_host:
            usages.append(EKU.SERVER_AUTH)
            names = [x509.DNSName("localhost")]
            try:
                names.insert(0, x509.IPAddress(ipaddress.ip_address(server_host)))
            except ValueError:
                names.insert(0, x509.DNSName(server_host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if client:
            usages.append(EKU.CLIENT_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def stack_cert_paths(directory: str) -> StackCerts:
    """The StackCerts paths inside `directory` (whether or not they exist yet)."""
    def pair(name: str) -> CertPair:
        return CertPair(os.path.join(directory, name + ".pem"),
                        os.path.join(directory, name + "-key.pem"))
    return StackCerts(os.path.join(directory, "ca.pem"), pair("server"), pair("client"),
                      os.path.join(directory, "rpc-ca.pem"), pair("rpc-provider"),
                      pair("rpc-consumer"))


def _all_files(paths: Iterable[Union[str, CertPair]]) -> List[str]:
    files: List[str] = []
    for item in paths:
        files.extend(item if isinstance(item, CertPair) else [item])
    return files


def make_stack_certs(directory: str, host: str = "127.0.0.1") -> StackCerts:
    """Make (once) the certificates of a secured stack bound to `host` in `directory`;
    returns their StackCerts. Existing files are kept, so running servers and
    configs that name them stay valid."""
    paths = stack_cert_paths(directory)
    if all(os.path.isfile(path) for path in _all_files(paths)):
        return paths
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _, _, serialization, _, _, _ = _crypto()
    written: Dict[str, bytes] = {}
    stores = _Authority("probe stack CA")
    rpc = _Authority("probe RPC CA")
    for authority, path in ((stores, paths.ca), (rpc, paths.rpc_ca)):
        written[path] = authority.cert.public_bytes(serialization.Encoding.PEM)
    for pair, (authority, name, server, client) in (
            (paths.server, (stores, "probe stack server", host, False)),
            (paths.client, (stores, "probe", None, True)),
            (paths.rpc_provider, (rpc, "probe provider", host, True)),
            (paths.rpc_consumer, (rpc, "probe consumer", None, True))):
        cert, key = authority.issue(name, server_host=server, client=client)
        written[pair.cert], written[pair.key] = cert, key
    for path, data in written.items():
        _write(path, data, private=path.endswith("-key.pem"))
    return paths
