//! Key Encryption Key protectors: where the secret that opens the KEK keyslot lives.
//!
//! A protector makes a fresh secret and a public, sealed form of it (the LUKS2 token's fields),
//! and turns a token back into the secret. Each kind writes the token format of its systemd
//! counterpart, so that stock `systemd-cryptsetup` unlocks what cryptfs enrolls.

pub mod der;
pub mod pkcs11;
pub mod tpm2;
pub mod tpm2_policy;

use serde_json::{Map, Value};

use crate::secret::Secret;

/// The public, sealed form of a KEK secret: the token's fields without `type` and `keyslots`.
/// Safe to journal: only the protecting device can turn it back into the secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SealedKek {
    /// The token fields (`tpm2-blob`, `tpm2-pcrs`, …).
    pub fields: Map<String, Value>,
}

impl SealedKek {
    /// The complete LUKS2 token for `keyslot`.
    pub fn token(&self, token_type: &str, keyslot: u32) -> Value {
        let mut token = Map::new();
        token.insert("type".into(), Value::from(token_type));
        token.insert("keyslots".into(), Value::from(vec![keyslot.to_string()]));
        token.extend(self.fields.clone());
        Value::Object(token)
    }

    /// The sealed form inside an existing token.
    pub fn from_token(token: &Value) -> Option<SealedKek> {
        let mut fields = token.as_object()?.clone();
        fields.remove("type");
        fields.remove("keyslots");
        Some(SealedKek { fields })
    }
}

/// A place that keeps the KEK secret: a TPM 2.0 or a PKCS#11 token.
pub trait KekProtector {
    /// The LUKS2 token type this protector writes and reads (`systemd-tpm2`).
    fn token_type(&self) -> &'static str;

    /// Checks that the protector is reachable and usable, changing nothing persistent.
    /// Called before any write to the device.
    fn preflight(&mut self) -> crate::Result<()>;

    /// Makes a new secret and seals it.
    fn seal(&mut self) -> crate::Result<(Secret, SealedKek)>;

    /// Recovers the secret from its sealed form.
    fn unseal(&mut self, sealed: &SealedKek) -> crate::Result<Secret>;

    /// Whether this protector can use `token` (right type, no features it lacks, e.g. a PIN).
    fn can_use(&self, token: &Value) -> bool;
}

/// Builds the protector the configuration asks for.
pub fn from_config(config: &crate::config::Config) -> crate::Result<Box<dyn KekProtector>> {
    match config.kek.kind {
        crate::config::KekKind::Tpm2 => Ok(Box::new(tpm2::Tpm2Protector::new(&config.kek.tpm2)?)),
        crate::config::KekKind::Pkcs11 => {
            let p11 = config.kek.pkcs11.as_ref().ok_or_else(|| {
                anyhow::anyhow!("kek.kind = \"pkcs11\" needs a [kek.pkcs11] section")
            })?;
            Ok(Box::new(pkcs11::Pkcs11Protector::new(p11)?))
        }
    }
}
