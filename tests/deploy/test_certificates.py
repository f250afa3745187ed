"""The federation's PKI: CA, SuperLink certificate, store keys, tokens (no processes)."""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from deploy.certificates import (
    PkiLayout,
    ca_bundle,
    certificate_info,
    check_store_name,
    create_ca,
    create_store_key,
    ensure_token,
    init_pki,
    issue_server_certificate,
    public_key_fingerprint,
    verify_server_certificate,
)
from deploy.errors import CertificateError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root, hosts=["coordinator.example.com", "10.0.0.5", "localhost"], stores=["store-01"])
    return PkiLayout(root)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_ca_server_certificate_and_store_material(pki: PkiLayout) -> None:
    # Assert: secrets are owner-only, public parts readable
    assert mode(pki.ca_key) == 0o600 and mode(pki.superlink_key) == 0o600
    assert mode(pki.store_private_key("store-01")) == 0o600
    assert mode(pki.store_token("store-01")) == 0o600
    assert mode(pki.root / "stores") == 0o700
    assert mode(pki.ca_cert) == 0o644 and mode(pki.store_public_key("store-01")) == 0o644
    ca = certificate_info(pki.ca_cert)
    server = verify_server_certificate(
        pki.ca_cert, pki.superlink_cert, pki.superlink_key, "10.0.0.5"
    )
    assert ca.is_ca and not server.is_ca and server.issuer == ca.subject
    assert server.dns_names == ("coordinator.example.com", "localhost")
    assert server.ip_addresses == ("10.0.0.5",)
    assert 390 < server.days_left <= 397 and ca.days_left > 3600
    assert pki.store_names() == ["store-01"]


def test_python_tls_accepts_the_chain_for_each_named_host(pki: PkiLayout) -> None:
    # A TLS handshake in memory: server context with the issued pair, client trusting the CA.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.superlink_cert, pki.superlink_key)
    for host, ok in [("coordinator.example.com", True), ("10.0.0.5", True), ("evil.com", False)]:
        client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname=host)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        error: Exception | None = None
        for _ in range(10):
            for side in (client, server):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as err:
                    error = err
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if error:
                break
        assert (error is None) == ok, (host, error)


def test_init_is_idempotent_and_adds_stores(pki: PkiLayout) -> None:
    # Arrange
    before = {
        p: p.read_bytes() for p in (pki.ca_key, pki.superlink_cert, pki.store_token("store-01"))
    }
    # Act
    _, _, keys = init_pki(pki.root, hosts=["other.example.com"], stores=["store-01", "store-02"])
    # Assert: nothing replaced, store-02 added
    assert {p: p.read_bytes() for p in before} == before
    assert [k.name for k in keys] == ["store-01", "store-02"]
    assert pki.store_names() == ["store-01", "store-02"]


def test_server_certificate_rotation_keeps_the_ca(pki: PkiLayout, tmp_path: Path) -> None:
    # Arrange: a copy, so the module's PKI stays as it was
    root = tmp_path / "pki"
    shutil.copytree(pki.root, root)
    layout = PkiLayout(root)
    old = certificate_info(layout.superlink_cert)
    # Act
    new = issue_server_certificate(
        layout.ca_cert,
        layout.ca_key,
        layout.superlink_cert,
        layout.superlink_key,
        hosts=["coordinator.example.com", "new.example.com"],
        days=30,
    )
    # Assert: a new certificate and key, same issuer, the new name, old key no longer matching
    assert new.serial != old.serial and new.issuer == old.issuer
    verify_server_certificate(layout.ca_cert, layout.superlink_cert, layout.superlink_key)
    verify_server_certificate(layout.ca_cert, layout.superlink_cert, host="new.example.com")
    with pytest.raises(CertificateError, match="not the private key"):
        verify_server_certificate(layout.ca_cert, layout.superlink_cert, pki.superlink_key)


def test_a_certificate_from_another_ca_is_refused(pki: PkiLayout, tmp_path: Path) -> None:
    create_ca(tmp_path / "ca.crt", tmp_path / "ca.key", common_name="rogue")
    with pytest.raises(CertificateError, match="not issued by the CA"):
        verify_server_certificate(tmp_path / "ca.crt", pki.superlink_cert)
    with pytest.raises(CertificateError, match="does not name"):
        verify_server_certificate(pki.ca_cert, pki.superlink_cert, host="evil.example.com")
    with pytest.raises(CertificateError, match="not the key of the CA"):
        issue_server_certificate(
            pki.ca_cert, tmp_path / "ca.key", tmp_path / "s.crt", tmp_path / "s.key", hosts=["x"]
        )


def test_an_expired_certificate_is_refused(pki: PkiLayout, tmp_path: Path) -> None:
    # Arrange: a certificate signed by the CA that expired yesterday
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(ca_cert.subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, ca_cert.signature_hash_algorithm)
    )
    path = tmp_path / "old.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Act / Assert
    with pytest.raises(CertificateError, match="not valid now"):
        verify_server_certificate(pki.ca_cert, path)


def test_private_keys_are_never_overwritten_by_accident(pki: PkiLayout) -> None:
    with pytest.raises(CertificateError, match="already exists"):
        create_ca(pki.ca_cert, pki.ca_key)
    with pytest.raises(CertificateError, match="already exists"):
        create_store_key(
            pki.store_private_key("store-01"), pki.store_public_key("store-01"), name="store-01"
        )


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(CertificateError, match="half of a CA"):
        init_pki(tmp_path, hosts=["localhost"])


def test_bad_hosts_and_garbage_files_are_clear_errors(pki: PkiLayout, tmp_path: Path) -> None:
    for host in ["bad host", "a/b", ""]:
        with pytest.raises(CertificateError):
            issue_server_certificate(
                pki.ca_cert, pki.ca_key, tmp_path / "s.crt", tmp_path / "s.key", hosts=[host]
            )
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(CertificateError, match="cannot read a PEM certificate"):
        certificate_info(tmp_path / "junk.crt")
    with pytest.raises(CertificateError, match="not an OpenSSH public key"):
        public_key_fingerprint(tmp_path / "junk.crt")


def test_ca_bundle_trusts_old_and_new_ca(pki: PkiLayout, tmp_path: Path) -> None:
    # Arrange: a new CA (a CA rotation) and a server certificate from it
    create_ca(tmp_path / "new-ca.crt", tmp_path / "new-ca.key")
    issue_server_certificate(
        tmp_path / "new-ca.crt", tmp_path / "new-ca.key", tmp_path / "s.crt", tmp_path / "s.key",
        hosts=["localhost"],
    )  # fmt: skip
    # Act
    bundle = ca_bundle([pki.ca_cert, tmp_path / "new-ca.crt"], tmp_path / "bundle.crt")
    # Assert: one trust store accepts certificates from both CAs
    ctx = ssl.create_default_context(cafile=str(bundle))
    assert len(ctx.get_ca_certs()) == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_verifies_the_chain(pki: PkiLayout) -> None:
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki.ca_cert), str(pki.superlink_cert)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), out


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_store_keys_are_what_ssh_keygen_reads(pki: PkiLayout) -> None:
    # The fingerprint matches ssh-keygen's, and the private key derives the public one.
    pub = pki.store_public_key("store-01")
    listed = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True)
    assert public_key_fingerprint(pub) in listed.stdout and "ECDSA" in listed.stdout
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(pki.store_private_key("store-01"))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert derived.stdout.split()[:2] == pub.read_text().split()[:2]


def test_flower_accepts_the_store_public_key(pki: PkiLayout) -> None:
    # What `flwr supernode register` runs on the key file before sending it.
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(pki.store_public_key("store-01"))


def test_tokens_are_random_stable_and_owner_only(tmp_path: Path) -> None:
    first = ensure_token(tmp_path / "a.admin-token")
    assert ensure_token(tmp_path / "a.admin-token") == first
    assert ensure_token(tmp_path / "b.admin-token") != first
    assert len(first) >= 43 and mode(tmp_path / "a.admin-token") == 0o600
    (tmp_path / "weak").write_text("changethis\n")
    assert ensure_token(tmp_path / "weak") != "changethis"  # a weak token is replaced


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", "a b", "Store-01", "-x", "x" * 64, "store_1", "st\u00e5re", "a\n"]
)
def test_store_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(CertificateError):
        check_store_name(name)


@given(st.text(max_size=80))
def test_an_accepted_store_name_is_a_safe_file_and_service_name(name: str) -> None:
    try:
        check_store_name(name)
    except CertificateError:
        return
    assert 1 <= len(name) <= 63 and name.isascii() and name == name.lower()
    assert not ({"/", ".", " ", "\\", "\n"} & set(name)) and not name.startswith("-")
