"""PKI: enrollment and revocation jobs, the CRL, certificate checks."""
