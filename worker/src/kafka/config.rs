//! KafkaConnection + resolved secrets → librdkafka properties.
//!
//! Certificates and keys are handed to librdkafka in memory (`ssl.ca.pem`,
//! `ssl.certificate.pem`, `ssl.key.pem`): nothing is written to disk. The secret values
//! live in [`Credentials`], whose `Debug` shows only which of them are set.

use rdkafka::ClientConfig;
use weir_crds::{KafkaConnectionSpec, SaslMechanism, SecretKeySelector};

/// What the client is for; sets a default `client.id` (the broker's logs and quotas see it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Consumer,
    Producer,
    Admin,
}

impl Role {
    fn client_id(self) -> &'static str {
        match self {
            Role::Consumer => "weir-consumer",
            Role::Producer => "weir-producer",
            Role::Admin => "weir-admin",
        }
    }
}

/// Which secret value of a KafkaConnection a Secret key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretPurpose {
    CaCert,
    ClientCert,
    ClientKey,
    Username,
    Password,
}

impl SecretPurpose {
    /// The field of the KafkaConnection that names the Secret key.
    pub fn field(self) -> &'static str {
        match self {
            SecretPurpose::CaCert => "spec.tls.caCert",
            SecretPurpose::ClientCert => "spec.tls.clientCert",
            SecretPurpose::ClientKey => "spec.tls.clientKey",
            SecretPurpose::Username => "spec.sasl.usernameSecretRef",
            SecretPurpose::Password => "spec.sasl.passwordSecretRef",
        }
    }
}

/// Every Secret key `spec` reads, with what it is for.
pub fn secret_selectors(spec: &KafkaConnectionSpec) -> Vec<(SecretPurpose, &SecretKeySelector)> {
    let mut out = Vec::new();
    if let Some(tls) = &spec.tls {
        out.extend(tls.ca_cert.iter().map(|s| (SecretPurpose::CaCert, s)));
        out.extend(
            tls.client_cert
                .iter()
                .map(|s| (SecretPurpose::ClientCert, s)),
        );
        out.extend(tls.client_key.iter().map(|s| (SecretPurpose::ClientKey, s)));
    }
    if let Some(sasl) = &spec.sasl {
        out.extend(
            sasl.username_secret_ref
                .iter()
                .map(|s| (SecretPurpose::Username, s)),
        );
        out.push((SecretPurpose::Password, &sasl.password_secret_ref));
    }
    out
}

/// The secret values a KafkaConnection needs, read from wherever the binary finds them
/// (the operator: the Secrets through the API; the worker: the environment variables the
/// operator sets from them).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    ca_cert: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "set" } else { "unset" };
        f.debug_struct("Credentials")
            .field("ca_cert", &set(&self.ca_cert))
            .field("client_cert", &set(&self.client_cert))
            .field("client_key", &set(&self.client_key))
            .field("username", &set(&self.username))
            .field("password", &set(&self.password))
            .finish()
    }
}

/// Why a KafkaConnection cannot become client settings. The messages name the field and
/// the Secret key, never a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: Secret {secret:?} key {key:?}: {detail}")]
    Secret {
        field: &'static str,
        secret: String,
        key: String,
        detail: String,
    },
}

impl ConfigError {
    /// The condition reason the operator reports for it.
    pub fn reason(&self) -> &'static str {
        match self {
            ConfigError::Secret { .. } => "SecretNotReady",
        }
    }
}

impl Credentials {
    /// Reads every Secret key `spec` names through `read`, checking that certificates and
    /// keys are PEM.
    pub fn resolve<E: std::fmt::Display>(
        spec: &KafkaConnectionSpec,
        mut read: impl FnMut(&SecretKeySelector) -> Result<String, E>,
    ) -> Result<Credentials, ConfigError> {
        let mut credentials = Credentials::default();
        for (purpose, selector) in secret_selectors(spec) {
            let failed = |detail: String| ConfigError::Secret {
                field: purpose.field(),
                secret: selector.name.clone(),
                key: selector.key.clone(),
                detail,
            };
            let value = read(selector).map_err(|e| failed(e.to_string()))?;
            let pem_kind = match purpose {
                SecretPurpose::CaCert | SecretPurpose::ClientCert => Some("CERTIFICATE-----"),
                SecretPurpose::ClientKey => Some("PRIVATE KEY-----"),
                SecretPurpose::Username | SecretPurpose::Password => None,
            };
            if let Some(marker) = pem_kind
                && !(value.contains("-----BEGIN ") && value.contains(marker))
            {
                return Err(failed(format!(
                    "is not PEM (expected a \"-----BEGIN ...{marker}\" block)"
                )));
            }
            if value.is_empty() {
                return Err(failed("is empty".into()));
            }
            let slot = match purpose {
                SecretPurpose::CaCert => &mut credentials.ca_cert,
                SecretPurpose::ClientCert => &mut credentials.client_cert,
                SecretPurpose::ClientKey => &mut credentials.client_key,
                SecretPurpose::Username => &mut credentials.username,
                SecretPurpose::Password => &mut credentials.password,
            };
            *slot = Some(value);
        }
        Ok(credentials)
    }
}

/// The librdkafka properties of a client for `role` on `connection`: bootstrap servers,
/// the security protocol its `tls` and `sasl` imply, CA, client certificate and key,
/// SASL mechanism and credentials, then its extra `properties` (which `validate()` keeps
/// free of anything carrying a secret; the settings derived here win over them anyway).
pub fn client_config(
    connection: &KafkaConnectionSpec,
    credentials: &Credentials,
    role: Role,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("client.id", role.client_id());
    for (key, value) in &connection.properties {
        config.set(key, value);
    }
    config.set("bootstrap.servers", connection.bootstrap_servers.join(","));
    let protocol = match (&connection.tls, &connection.sasl) {
        (None, None) => "plaintext",
        (Some(_), None) => "ssl",
        (None, Some(_)) => "sasl_plaintext",
        (Some(_), Some(_)) => "sasl_ssl",
    };
    config.set("security.protocol", protocol);
    if let Some(tls) = &connection.tls {
        match &credentials.ca_cert {
            Some(ca) => config.set("ssl.ca.pem", ca),
            // The system's roots, wherever this image keeps them.
            None => config.set("ssl.ca.location", "probe"),
        };
        if let (Some(cert), Some(key)) = (&credentials.client_cert, &credentials.client_key) {
            config.set("ssl.certificate.pem", cert);
            config.set("ssl.key.pem", key);
        }
        config.set(
            "ssl.endpoint.identification.algorithm",
            if tls.insecure_skip_hostname_verification {
                "none"
            } else {
                "https"
            },
        );
    }
    if let Some(sasl) = &connection.sasl {
        config.set(
            "sasl.mechanisms",
            match sasl.mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            },
        );
        let username = sasl
            .username
            .as_ref()
            .or(credentials.username.as_ref())
            .cloned()
            .unwrap_or_default();
        config.set("sasl.username", username);
        config.set(
            "sasl.password",
            credentials.password.clone().unwrap_or_default(),
        );
    }
    config
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weir_crds::{SaslConfig, TlsConfig};

    use super::*;

    fn selector(name: &str, key: &str) -> SecretKeySelector {
        SecretKeySelector {
            name: name.into(),
            key: key.into(),
        }
    }

    fn secure() -> KafkaConnectionSpec {
        KafkaConnectionSpec {
            bootstrap_servers: vec!["a:9093".into(), "b:9093".into()],
            tls: Some(TlsConfig {
                ca_cert: Some(selector("kafka-ca", "ca.crt")),
                client_cert: Some(selector("kafka-client", "tls.crt")),
                client_key: Some(selector("kafka-client", "tls.key")),
                insecure_skip_hostname_verification: false,
            }),
            sasl: Some(SaslConfig {
                mechanism: SaslMechanism::ScramSha512,
                username: None,
                username_secret_ref: Some(selector("kafka-user", "username")),
                password_secret_ref: selector("kafka-user", "password"),
            }),
            properties: BTreeMap::from([
                ("client.rack".to_owned(), "eu-1a".to_owned()),
                ("security.protocol".to_owned(), "plaintext".to_owned()),
            ]),
        }
    }

    fn read(selector: &SecretKeySelector) -> Result<String, String> {
        Ok(match selector.key.as_str() {
            "ca.crt" | "tls.crt" => {
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            }
            "tls.key" => "-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n",
            "username" => "weir",
            "password" => "s3cret-pw",
            other => return Err(format!("no key {other}")),
        }
        .to_owned())
    }

    #[test]
    fn sasl_ssl_with_mutual_tls_sets_every_property_in_memory() {
        let spec = secure();
        let credentials = Credentials::resolve(&spec, read).unwrap();
        let config = client_config(&spec, &credentials, Role::Producer);
        let get = |k: &str| config.get(k).map(str::to_owned);
        assert_eq!(get("bootstrap.servers").as_deref(), Some("a:9093,b:9093"));
        assert_eq!(get("security.protocol").as_deref(), Some("sasl_ssl"));
        assert_eq!(get("sasl.mechanisms").as_deref(), Some("SCRAM-SHA-512"));
        assert_eq!(get("sasl.username").as_deref(), Some("weir"));
        assert_eq!(get("sasl.password").as_deref(), Some("s3cret-pw"));
        assert!(get("ssl.ca.pem").unwrap().contains("BEGIN CERTIFICATE"));
        assert!(get("ssl.key.pem").unwrap().contains("PRIVATE KEY"));
        assert!(get("ssl.certificate.pem").is_some());
        assert_eq!(get("client.rack").as_deref(), Some("eu-1a"));
        assert_eq!(get("client.id").as_deref(), Some("weir-producer"));
        assert_eq!(
            get("ssl.endpoint.identification.algorithm").as_deref(),
            Some("https")
        );
        // In memory: no file locations.
        assert!(
            config
                .config_map()
                .keys()
                .all(|k| !k.ends_with(".location"))
        );
    }

    #[test]
    fn the_protocol_follows_tls_and_sasl() {
        let mut spec = secure();
        spec.properties.clear();
        spec.sasl = None;
        let c = client_config(&spec, &Credentials::default(), Role::Admin);
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        // Without a CA the system's roots.
        let c = client_config(
            &KafkaConnectionSpec {
                tls: Some(TlsConfig::default()),
                ..spec.clone()
            },
            &Credentials::default(),
            Role::Admin,
        );
        assert_eq!(c.get("ssl.ca.location"), Some("probe"));
        spec.tls = None;
        let c = client_config(&spec, &Credentials::default(), Role::Consumer);
        assert_eq!(c.get("security.protocol"), Some("plaintext"));
        assert!(c.get("sasl.password").is_none());
    }

    #[test]
    fn a_secret_that_is_not_pem_is_named_without_its_value() {
        let spec = secure();
        let err = Credentials::resolve(&spec, |s: &SecretKeySelector| {
            if s.key == "tls.key" {
                Ok("hunter2-not-a-key".to_owned())
            } else {
                read(s)
            }
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("spec.tls.clientKey: Secret \"kafka-client\" key \"tls.key\""),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
        assert_eq!(err.reason(), "SecretNotReady");
    }

    #[test]
    fn a_missing_secret_names_the_field() {
        let spec = secure();
        let err = Credentials::resolve(&spec, |s: &SecretKeySelector| {
            if s.key == "password" {
                Err("Secret \"kafka-user\" does not exist")
            } else {
                read(s).map_err(|_| "x")
            }
        })
        .unwrap_err();
        assert!(
            err.to_string().starts_with("spec.sasl.passwordSecretRef:"),
            "{err}"
        );
    }

    #[test]
    fn credentials_debug_shows_no_value() {
        let credentials = Credentials::resolve(&secure(), read).unwrap();
        let shown = format!("{credentials:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("BBBB"),
            "{shown}"
        );
    }
}
