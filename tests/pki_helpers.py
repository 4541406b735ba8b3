"""CSRs as a device would make them, and a tampered one, for the PKI and enrollment tests."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_csr(common_name: str, key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def tamper_signature(pem: bytes) -> bytes:
    """The same CSR with bits flipped inside its signature: parses, does not verify."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
