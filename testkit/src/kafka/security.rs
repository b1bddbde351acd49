//! The broker's secured listeners and their throwaway credentials, made fresh for every
//! broker: a CA (rcgen) that signs the broker's certificate and a client certificate,
//! a second CA that signs nothing the broker trusts (the "wrong CA" of the tests, and a
//! client certificate the broker must reject), a SCRAM-SHA-512 user (added at format time)
//! and a PLAIN user.
//!
//! | listener | protocol | authentication |
//! | --- | --- | --- |
//! | `sasl_ssl` | SASL_SSL | SCRAM-SHA-512, `scram_user` / `scram_password` |
//! | `ssl` | SSL | a client certificate signed by `ca_pem` is required |
//! | `sasl_plaintext` | SASL_PLAINTEXT | PLAIN, `plain_user` / `plain_password` |

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};

use crate::{HarnessError, Result};

const PART: &str = "kafka";

/// Addresses and credentials of a broker's secured listeners.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KafkaSecurity {
    /// host:port of the SASL_SSL listener (SCRAM-SHA-512).
    pub sasl_ssl: String,
    /// host:port of the SSL listener that requires a client certificate.
    pub ssl: String,
    /// host:port of the SASL_PLAINTEXT listener (PLAIN).
    pub sasl_plaintext: String,
    /// The CA that signed the broker's certificate and `client_cert_pem`.
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// A CA the broker's certificate is not signed by.
    pub other_ca_pem: String,
    /// A client certificate signed by `other_ca_pem`: the broker rejects it.
    pub other_client_cert_pem: String,
    pub other_client_key_pem: String,
    pub scram_user: String,
    pub scram_password: String,
    pub plain_user: String,
    pub plain_password: String,
}

/// The ports of the secured listeners.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ports {
    pub sasl_ssl: u16,
    pub ssl: u16,
    pub sasl_plaintext: u16,
}

impl KafkaSecurity {
    /// Writes the broker's key store (its key and certificate) and trust store (the CA)
    /// into `dir`; returns the server.properties lines of the secured listeners (without
    /// `listeners`, which the caller writes).
    pub(super) fn broker_properties(&self, dir: &Path, broker: &BrokerKeys) -> Result<String> {
        let keystore = dir.join("broker-keystore.pem");
        let truststore = dir.join("broker-truststore.pem");
        write(&keystore, &format!("{}{}", broker.key_pem, broker.cert_pem))?;
        write(&truststore, &self.ca_pem)?;
        Ok(format!(
            "sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_{user}=\"{password}\";
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={truststore}
listener.name.ssl.ssl.client.auth=required
",
            user = self.plain_user,
            password = self.plain_password,
            keystore = keystore.display(),
            truststore = truststore.display(),
        ))
    }

    /// The StorageTool argument that adds the SCRAM user at format time.
    pub(super) fn add_scram(&self) -> String {
        format!(
            "SCRAM-SHA-512=[name={},password={}]",
            self.scram_user, self.scram_password
        )
    }

    /// Saves the whole description (for the test processes of a run) as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(|e| HarnessError::Start {
            part: PART,
            detail: format!("serializing the listener credentials: {e}"),
        })?;
        write(path, &json)
    }

    /// Reads what [`KafkaSecurity::save`] wrote.
    pub fn load(path: &Path) -> Result<KafkaSecurity> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| HarnessError::io(PART, "reading the listener credentials", source))?;
        serde_json::from_str(&text).map_err(|e| HarnessError::Start {
            part: PART,
            detail: format!("{}: {e}", path.display()),
        })
    }
}

/// The broker's own key and certificate (signed by the test CA), kept out of
/// [`KafkaSecurity`]: no client needs them.
#[derive(Debug)]
pub(super) struct BrokerKeys {
    key_pem: String,
    cert_pem: String,
}

/// Makes the CAs, the broker's certificate, the client certificates and the users for
/// listeners on `ports` of 127.0.0.1.
pub(super) fn generate(ports: Ports) -> Result<(KafkaSecurity, BrokerKeys)> {
    let failed = |e: rcgen::Error| HarnessError::Start {
        part: PART,
        detail: format!("making the test certificates: {e}"),
    };
    let ca = new_ca("weir test CA").map_err(failed)?;
    let other = new_ca("weir unknown test CA").map_err(failed)?;
    let (cert_pem, key_pem) = leaf(
        &ca,
        &["127.0.0.1", "localhost"],
        "weir-test-broker",
        ExtendedKeyUsagePurpose::ServerAuth,
    )
    .map_err(failed)?;
    let client = leaf(
        &ca,
        &[],
        "weir-test-client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )
    .map_err(failed)?;
    let other_client = leaf(
        &other,
        &[],
        "weir-test-client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )
    .map_err(failed)?;
    let secret = || uuid::Uuid::new_v4().simple().to_string();
    let security = KafkaSecurity {
        sasl_ssl: format!("127.0.0.1:{}", ports.sasl_ssl),
        ssl: format!("127.0.0.1:{}", ports.ssl),
        sasl_plaintext: format!("127.0.0.1:{}", ports.sasl_plaintext),
        ca_pem: ca.pem(),
        client_cert_pem: client.0,
        client_key_pem: client.1,
        other_ca_pem: other.pem(),
        other_client_cert_pem: other_client.0,
        other_client_key_pem: other_client.1,
        scram_user: "weir-scram".to_owned(),
        scram_password: secret(),
        plain_user: "weir-plain".to_owned(),
        plain_password: secret(),
    };
    Ok((security, BrokerKeys { key_pem, cert_pem }))
}

fn new_ca(name: &str) -> std::result::Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

/// A certificate and its PKCS#8 key, both PEM.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> std::result::Result<(String, String), rcgen::Error> {
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content)
        .map_err(|source| HarnessError::io(PART, &format!("writing {}", path.display()), source))
}

/// Where a run's listener credentials live: beside the broker's data.
pub(super) fn file_in(dir: &Path) -> PathBuf {
    dir.join("security.json")
}
