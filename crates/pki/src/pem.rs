//! PEM decoding with size caps and named inputs.
//!
//! Uses the PEM decoder of `rustls-pki-types` (re-exported by rustls) rather
//! than the `rustls-pemfile` crate, which its authors have retired in favour
//! of it.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{PkiError, Result};

/// Largest PEM input accepted. Ferry's certificates and keys are well under
/// 4 KiB; the cap only exists so that a hostile or mistaken input (a disk
/// image passed as `--ca`) is refused before it is decoded.
pub const MAX_PEM_BYTES: usize = 1 << 20;

fn check_size(pem: &str, what: &str) -> Result<()> {
    if pem.len() > MAX_PEM_BYTES {
        return Err(PkiError::TooLarge {
            what: what.to_owned(),
            limit: MAX_PEM_BYTES,
        });
    }
    Ok(())
}

/// Every `CERTIFICATE` block in `pem`; at least one.
pub(crate) fn parse_certs_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    check_size(pem, what)?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|source| PkiError::Pem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::PemMissing {
            what: what.to_owned(),
            expected: "CERTIFICATE block",
        });
    }
    Ok(certs)
}

/// The one `CERTIFICATE` block in `pem`.
pub(crate) fn parse_single_cert_pem(pem: &str, what: &str) -> Result<CertificateDer<'static>> {
    let mut certs = parse_certs_pem(pem, what)?;
    if certs.len() != 1 {
        return Err(PkiError::PemTooMany {
            what: what.to_owned(),
            count: certs.len(),
        });
    }
    Ok(certs.remove(0))
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub(crate) fn parse_key_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>> {
    check_size(pem, what)?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| match source {
        pem::Error::NoItemsFound => PkiError::PemMissing {
            what: what.to_owned(),
            expected: "private key",
        },
        source => PkiError::Pem {
            what: what.to_owned(),
            source,
        },
    })
}
