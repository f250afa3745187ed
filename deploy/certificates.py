"""The federation's keys and certificates: a CA, the SuperLink's TLS certificate, store keys.

Everything is EC P-384 (what `flwr supernode register` accepts for store keys), written with
the `cryptography` package — no openssl or ssh-keygen needed. Private keys are created with
mode 0600 and never overwritten unless asked. Layout of a PKI directory (`PkiLayout`)::

    ca.crt  ca.key              the CA (keep ca.key offline; only ca.crt travels)
    superlink.crt superlink.key the SuperLink's TLS certificate, signed by the CA
    stores/<name>.key           a store's SuperNode authentication key (OpenSSH private key)
    stores/<name>.pub           its public half (OpenSSH), registered on the SuperLink
    stores/<name>.admin-token   the store's edge admin token (0600)

The CA certificate is what every SuperNode and admin client trusts (``--root-certificates``,
``root-certificates`` in Flower's config.toml); the store keys are how the SuperLink
recognises stores (``--enable-supernode-auth``). The two are independent: rotating the
SuperLink's certificate does not touch the stores' keys, and revoking a store does not touch
TLS.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.errors import CertificateError

CA_DAYS = 3650
SERVER_DAYS = 397
# Store names end up in file names, Flower node names and compose service names.
STORE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True)
class CertInfo:
    """What an operator needs to know about a certificate (``fedrec deploy pki show``)."""

    path: str
    subject: str
    issuer: str
    serial: str
    not_before: str
    not_after: str
    days_left: float
    is_ca: bool
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        out = asdict(self)
        out["dns_names"] = list(self.dns_names)
        out["ip_addresses"] = list(self.ip_addresses)
        return out


@dataclass(frozen=True)
class StoreKey:
    """A store's SuperNode key pair (OpenSSH files) and its public-key fingerprint."""

    name: str
    private_key: Path
    public_key: Path
    fingerprint: str


@dataclass(frozen=True)
class PkiLayout:
    """Where the files of one PKI directory live."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        """The CA certificate (public; every SuperNode and admin client trusts it)."""
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA's private key (keep it offline)."""
        return self.root / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.root / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.root / "superlink.key"

    def store_private_key(self, name: str) -> Path:
        """A store's SuperNode private key (OpenSSH)."""
        return self.root / "stores" / f"{check_store_name(name)}.key"

    def store_public_key(self, name: str) -> Path:
        """A store's SuperNode public key (OpenSSH), what the SuperLink registers."""
        return self.root / "stores" / f"{check_store_name(name)}.pub"

    def store_token(self, name: str) -> Path:
        """A store's edge admin token (``FEDREC_EDGE_ADMIN_TOKEN``, mode 0600)."""
        return self.root / "stores" / f"{check_store_name(name)}.admin-token"

    def ensure_stores_dir(self) -> Path:
        """``stores/``, created owner-only (0700): it holds private keys and tokens."""
        path = self.root / "stores"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        return path

    def store_names(self) -> list[str]:
        """Names of the stores that have a public key here, sorted."""
        return sorted(p.stem for p in (self.root / "stores").glob("*.pub"))


def check_store_name(name: str) -> str:
    """Return ``name`` if it is a valid store name (``store-01``), else raise."""
    if not STORE_NAME.fullmatch(name):
        raise CertificateError(
            f"store name {name!r} must be 1-63 characters of a-z, 0-9 and '-', starting with a "
            "letter or digit"
        )
    return name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write a secret with mode 0600, atomically; refuse to replace one unless ``overwrite``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise CertificateError(f"{path} already exists; refusing to overwrite a private key")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file; `CertificateError` if absent or unreadable."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CertificateError(f"cannot read a PEM certificate from {path}: {err}") from err


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An EC private key from a PEM or OpenSSH file."""
    try:
        data = path.read_bytes()
        key = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH PRIVATE KEY" in data
            else serialization.load_pem_private_key(data, password=None)
        )
    except (OSError, ValueError, TypeError) as err:
        raise CertificateError(f"cannot read a private key from {path}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} is not an elliptic-curve key")
    return key


def certificate_info(path: Path) -> CertInfo:
    """Subject, issuer, validity, SANs and SHA-256 fingerprint of a PEM certificate."""
    cert = load_certificate(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    not_after = cert.not_valid_after_utc
    return CertInfo(
        path=str(path),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=not_after.isoformat(),
        days_left=round((not_after - _now()).total_seconds() / 86400, 1),
        is_ca=is_ca,
        dns_names=dns,
        ip_addresses=ips,
        sha256=cert.fingerprint(hashes.SHA256()).hex(":"),
    )


def create_ca(
    cert_path: Path,
    key_path: Path,
    *,
    common_name: str = "fedrec federation CA",
    organization: str = "fedrec",
    days: int = CA_DAYS,
    overwrite: bool = False,
) -> CertInfo:
    """Create a self-signed CA (EC P-384) that signs the SuperLink's certificate.

    Refuses to replace an existing CA key unless ``overwrite``: every store trusts the old
    CA certificate, so a new CA is a rotation (docs/deploy.md), never an accident.
    """
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name(common_name, organization)
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key), overwrite=overwrite)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return certificate_info(cert_path)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not host:
            raise CertificateError("an empty host name")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,251}[A-Za-z0-9])?", host):
                raise CertificateError(
                    f"{host!r} is neither an IP address nor a DNS name"
                ) from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_server_certificate(
    ca_cert_path: Path,
    ca_key_path: Path,
    cert_path: Path,
    key_path: Path,
    *,
    hosts: Sequence[str],
    organization: str = "fedrec",
    days: int = SERVER_DAYS,
) -> CertInfo:
    """Issue the SuperLink's TLS certificate for ``hosts`` (DNS names and IP addresses).

    Every name or address stores and admins use to reach the SuperLink must be listed:
    clients check it against the certificate's subject alternative names. Issuing again
    replaces the certificate and its key (that is the rotation; stores keep trusting the
    same CA, so nothing changes on their side).
    """
    if not hosts:
        raise CertificateError("a server certificate needs at least one host name or address")
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")
    san = _san(hosts)  # validates every host before anything is written
    ca_cert = load_certificate(ca_cert_path)
    ca_key = load_private_key(ca_key_path)
    if ca_cert.public_key() != ca_key.public_key():
        raise CertificateError(f"{ca_key_path} is not the key of the CA {ca_cert_path}")
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0][:64], organization))  # CN is at most 64 characters
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key), overwrite=True)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return certificate_info(cert_path)


def verify_server_certificate(
    ca_cert_path: Path, cert_path: Path, key_path: Path | None = None, host: str | None = None
) -> CertInfo:
    """Check a certificate: issued by the CA, valid now, matching its key, naming ``host``.

    Raises `CertificateError` naming the first problem found.
    """
    ca_cert = load_certificate(ca_cert_path)
    cert = load_certificate(cert_path)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CertificateError(f"{cert_path} was not issued by the CA in {ca_cert_path}") from err
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(
            f"{cert_path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d})"
        )
    if key_path is not None and load_private_key(key_path).public_key() != cert.public_key():
        raise CertificateError(f"{key_path} is not the private key of {cert_path}")
    info = certificate_info(cert_path)
    if host is not None and host not in info.dns_names + info.ip_addresses:
        raise CertificateError(
            f"{cert_path} does not name {host!r} (it names "
            f"{', '.join(info.dns_names + info.ip_addresses)}); reissue it with that host"
        )
    return info


def ca_bundle(ca_certs: Sequence[Path], out: Path) -> Path:
    """Concatenate CA certificates into one PEM file that clients trust during a CA rotation."""
    pems = [load_certificate(p).public_bytes(serialization.Encoding.PEM) for p in ca_certs]
    if not pems:
        raise CertificateError("a CA bundle needs at least one certificate")
    _write_public(out, b"".join(pems))
    return out


def public_key_fingerprint(public_key_path: Path) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key, as ``ssh-keygen -lf`` prints it."""
    try:
        fields = public_key_path.read_text(encoding="ascii").split()
        blob = base64.b64decode(fields[1], validate=True)
    except (OSError, ValueError, IndexError) as err:
        raise CertificateError(f"{public_key_path} is not an OpenSSH public key: {err}") from err
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def create_store_key(
    private_path: Path, public_path: Path, *, name: str, overwrite: bool = False
) -> StoreKey:
    """Create a store's SuperNode key pair (EC P-384, OpenSSH format, private key 0600).

    The public key is registered on the SuperLink (`flwr supernode register`); the private
    key stays on the store box (``flower-supernode --auth-supernode-private-key``).
    """
    check_store_name(name)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(private_path, private, overwrite=overwrite)
    _write_public(public_path, public + f" fedrec-{name}\n".encode())
    return StoreKey(name, private_path, public_path, public_key_fingerprint(public_path))


def ensure_token(path: Path) -> str:
    """The secret token stored in ``path``; a new random one (mode 0600) when there is none.

    Used for each edge service's admin token (``FEDREC_EDGE_ADMIN_TOKEN``): 32 random bytes,
    URL-safe base64 (43 characters).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        token = path.read_text(encoding="ascii").strip()
        if len(token) >= 32:
            path.chmod(0o600)
            return token
    token = secrets.token_urlsafe(32)
    _write_private(path, (token + "\n").encode("ascii"), overwrite=True)
    return token


def init_pki(
    root: Path,
    *,
    hosts: Sequence[str],
    stores: Sequence[str] = (),
    ca_days: int = CA_DAYS,
    server_days: int = SERVER_DAYS,
) -> tuple[CertInfo, CertInfo, list[StoreKey]]:
    """Create what is missing in a PKI directory: CA, SuperLink certificate, store keys, tokens.

    Existing files are kept (running it again only adds new stores), so it is safe to use
    as an idempotent set-up step.
    """
    layout = PkiLayout(root)
    if layout.ca_key.exists() != layout.ca_cert.exists():
        raise CertificateError(f"{root} holds only half of a CA (ca.crt and ca.key go together)")
    if not layout.ca_cert.exists():
        create_ca(layout.ca_cert, layout.ca_key, days=ca_days)
    if not layout.superlink_cert.exists() or not layout.superlink_key.exists():
        issue_server_certificate(
            layout.ca_cert,
            layout.ca_key,
            layout.superlink_cert,
            layout.superlink_key,
            hosts=hosts,
            days=server_days,
        )
    keys = []
    if stores:
        layout.ensure_stores_dir()
    for name in stores:
        ensure_token(layout.store_token(name))
        private, public = layout.store_private_key(name), layout.store_public_key(name)
        if private.exists() and public.exists():
            keys.append(StoreKey(name, private, public, public_key_fingerprint(public)))
        else:
            keys.append(create_store_key(private, public, name=name))
    return certificate_info(layout.ca_cert), certificate_info(layout.superlink_cert), keys
