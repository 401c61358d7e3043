//! HTTPS for the API: a certificate and key from PEM files, re-read on SIGHUP (a renewed
//! certificate takes effect for new connections without a restart; a pair that fails to load
//! leaves the old one in force).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The certificate chain and private key the API serves HTTPS with.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A TLS acceptor whose certificate can be replaced while connections are served.
#[derive(Clone)]
pub struct ReloadableTls {
    files: TlsFiles,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ReloadableTls {
    /// Loads `files`; fails with a readable message if they do not make a usable pair.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            config: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Re-reads the files; on error the old certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.files)?;
        *self.config.write().expect("tls lock") = Arc::new(config);
        Ok(())
    }

    /// An acceptor with the certificate in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().expect("tls lock").clone())
    }
}

fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let chain = read_chain(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|err| format!("TLS key {}: {err}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| {
            format!(
                "TLS certificate {} and key {} do not make a usable pair: {err}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The PEM certificates in `path` (the etcd channel's CA and client certificate use it too).
pub(crate) fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("TLS certificate {}: {err}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("TLS certificate {}: {err}", path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "TLS certificate {}: no certificate in it",
            path.display()
        ));
    }
    Ok(chain)
}
