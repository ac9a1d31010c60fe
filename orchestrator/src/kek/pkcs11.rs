//! The `systemd-pkcs11` protector: a 128-byte secret (RSA bits / 16) encrypted with PKCS#1 v1.5
//! to the public key of the certificate on the token; only the token's private key, which never
//! leaves it, decrypts it.
//!
//! Provisioning follows the reference (LmP on OP-TEE): when no token carries the label, the
//! configured slot is initialised with it, the user PIN set, an RSA-2048 key pair generated on the
//! token (private: sensitive, never extractable, decrypt+sign) and a self-signed `CN=LmP`
//! certificate (SHA-256 with RSA, 20 years) signed *by the token* stored beside it. An existing
//! token or key is never erased: if the label exists, it is used.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use base64::Engine;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rand::RngCore;
use serde_json::{Map, Value};

use super::{der, KekProtector, SealedKek};
use crate::config::Pkcs11Config;
use crate::secret::Secret;

/// Token type written and read.
pub const TOKEN_TYPE: &str = "systemd-pkcs11";

/// PKCS#11 protector.
pub struct Pkcs11Protector {
    config: Pkcs11Config,
    key_id: Vec<u8>,
    context: Option<Pkcs11>,
}

/// The attributes a `pkcs11:` URI names (RFC 7512; only those systemd writes).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`
    pub token: Option<String>,
    /// `object=`
    pub object: Option<String>,
    /// `id=` (raw bytes)
    pub id: Option<Vec<u8>>,
}

fn percent_decode(text: &str) -> crate::Result<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .context("bad %-escape in pkcs11 URI")?;
            out.push(u8::from_str_radix(hex, 16).context("bad %-escape in pkcs11 URI")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Pkcs11Uri {
    /// Parses the path attributes of a `pkcs11:` URI (query attributes are ignored).
    pub fn parse(uri: &str) -> crate::Result<Pkcs11Uri> {
        let path = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| anyhow!("not a pkcs11: URI: {uri}"))?;
        let path = path.split('?').next().unwrap_or("");
        let mut parsed = Pkcs11Uri::default();
        for part in path.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let value = percent_decode(value)?;
            match key {
                "token" => parsed.token = Some(String::from_utf8_lossy(&value).into_owned()),
                "object" => parsed.object = Some(String::from_utf8_lossy(&value).into_owned()),
                "id" => parsed.id = Some(value),
                _ => {}
            }
        }
        Ok(parsed)
    }
}

fn read_pin(path: &Path, what: &str) -> crate::Result<AuthPin> {
    let bytes = crate::secret::read_secret_file(path, &format!("PKCS#11 {what}"))?;
    let pin = std::str::from_utf8(&bytes)
        .with_context(|| format!("the PKCS#11 {what} file {} is not UTF-8", path.display()))?;
    Ok(AuthPin::from(pin.to_string()))
}

impl Pkcs11Protector {
    /// A protector for `config` (the module is loaded on first use).
    pub fn new(config: &Pkcs11Config) -> crate::Result<Self> {
        let key_id = hex::decode(&config.key_id).context("kek.pkcs11.key_id is not hex")?;
        Ok(Pkcs11Protector {
            config: config.clone(),
            key_id,
            context: None,
        })
    }

    fn context(&mut self) -> crate::Result<&Pkcs11> {
        if self.context.is_none() {
            let module = &self.config.module;
            let ctx = Pkcs11::new(module).map_err(|e| {
                anyhow!("PKCS#11 module {} cannot be loaded: {e}", module.display())
            })?;
            ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .map_err(|e| {
                    anyhow!(
                        "PKCS#11 module {} failed to initialise: {e}",
                        module.display()
                    )
                })?;
            self.context = Some(ctx);
        }
        self.context
            .as_ref()
            .ok_or_else(|| anyhow!("PKCS#11 module not loaded"))
    }

    fn no_slot(label: &str) -> anyhow::Error {
        anyhow!("no slot with token named \"{label}\" found")
    }

    /// The slot whose token carries `label`.
    fn slot_of(&mut self, label: &str) -> crate::Result<Option<Slot>> {
        let ctx = self.context()?;
        for slot in ctx.get_slots_with_initialized_token()? {
            if ctx.get_token_info(slot)?.label().trim_end() == label {
                return Ok(Some(slot));
            }
        }
        Ok(None)
    }

    /// The slot the configuration says to initialise, if it exists and has a token present.
    fn slot_to_initialise(&mut self) -> crate::Result<Option<Slot>> {
        let wanted = self.config.slot;
        let ctx = self.context()?;
        Ok(ctx
            .get_slots_with_token()?
            .into_iter()
            .find(|s| s.id() == wanted))
    }

    fn login(&self, session: &Session, label: &str) -> crate::Result<()> {
        let pin = read_pin(&self.config.pin_file, "PIN")?;
        session
            .login(UserType::User, Some(&pin))
            .map_err(|e| match e {
                P11Error::Pkcs11(RvError::PinIncorrect, _) => anyhow!(
                    "wrong PIN for PKCS#11 token \"{label}\" (from {})",
                    self.config.pin_file.display()
                ),
                P11Error::Pkcs11(RvError::PinLocked, _) => {
                    anyhow!(
                        "the PIN of PKCS#11 token \"{label}\" is locked: unlock it with the SO PIN"
                    )
                }
                P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _) => anyhow!("already logged in"),
                other => anyhow!("cannot log in to PKCS#11 token \"{label}\": {other}"),
            })
    }

    fn find(session: &Session, template: &[Attribute]) -> crate::Result<Option<ObjectHandle>> {
        Ok(session.find_objects(template)?.into_iter().next())
    }

    fn object_template(
        &self,
        class: ObjectClass,
        label: &str,
        id: Option<&[u8]>,
    ) -> Vec<Attribute> {
        let mut t = vec![
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        if let Some(id) = id {
            t.push(Attribute::Id(id.to_vec()));
        }
        t
    }

    /// Makes sure the token, its key pair and its certificate exist; returns the token's slot.
    /// Never erases anything.
    pub fn provision(&mut self) -> crate::Result<Slot> {
        let label = self.config.token_label.clone();
        let slot = match self.slot_of(&label)? {
            Some(slot) => slot,
            None => {
                let slot = self
                    .slot_to_initialise()?
                    .ok_or_else(|| Self::no_slot(&label))?;
                let so_path = self.config.so_pin_file.clone().ok_or_else(|| {
                    anyhow!(
                        "token \"{label}\" must be initialised but no so_pin_file is configured"
                    )
                })?;
                let so_pin = read_pin(&so_path, "SO PIN")?;
                let user_pin = read_pin(&self.config.pin_file, "PIN")?;
                let ctx = self.context()?;
                ctx.init_token(slot, &so_pin, &label).with_context(|| {
                    format!("cannot initialise token \"{label}\" in slot {}", slot.id())
                })?;
                let session = ctx.open_rw_session(slot)?;
                session.login(UserType::So, Some(&so_pin))?;
                session.init_pin(&user_pin)?;
                session.logout()?;
                tracing::info!(slot = slot.id(), %label, "PKCS#11 token initialised");
                // Some modules (SoftHSM2) move an initialised token to a new slot id.
                self.slot_of(&label)?.ok_or_else(|| Self::no_slot(&label))?
            }
        };
        let session = self.context()?.open_rw_session(slot)?;
        self.login(&session, &label)?;
        if !self.key_pair_present(&session)? {
            let (label, id) = (self.config.key_label.clone(), self.key_id.clone());
            self.generate(&session, &label, &id)?;
        }
        Ok(slot)
    }

    /// Whether the configured key pair and its certificate are on the token. One without the
    /// other is the reference's fatal "PKCS#11 certificate not found": nothing is guessed.
    fn key_pair_present(&self, session: &Session) -> crate::Result<bool> {
        let (label, id) = (&self.config.key_label, &self.key_id);
        let private = Self::find(
            session,
            &self.object_template(ObjectClass::PRIVATE_KEY, label, Some(id)),
        )?;
        let cert = Self::find(
            session,
            &self.object_template(ObjectClass::CERTIFICATE, label, Some(id)),
        )?;
        match (private, cert) {
            (Some(_), Some(_)) => Ok(true),
            (None, None) => Ok(false),
            _ => bail!("PKCS#11 certificate not found"),
        }
    }

    fn generate(&self, session: &Session, label: &str, id: &[u8]) -> crate::Result<()> {
        let public_template = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Encrypt(true),
            Attribute::Verify(true),
            Attribute::ModulusBits(2048.into()),
            Attribute::PublicExponent(vec![1, 0, 1]),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let private_template = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Decrypt(true),
            Attribute::Sign(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let (public, private) = session
            .generate_key_pair(
                &Mechanism::RsaPkcsKeyPairGen,
                &public_template,
                &private_template,
            )
            .context("the token could not generate an RSA-2048 key pair")?;
        let attrs = session.get_attributes(
            public,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )?;
        let (mut n, mut e) = (Vec::new(), Vec::new());
        for a in attrs {
            match a {
                Attribute::Modulus(v) => n = v,
                Attribute::PublicExponent(v) => e = v,
                _ => {}
            }
        }
        let mut serial = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut serial);
        serial[0] &= 0x7f;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let tbs = der::tbs_certificate(&serial, "LmP", now, 20, &der::rsa_spki(&n, &e));
        let signature = session
            .sign(&Mechanism::Sha256RsaPkcs, private, &tbs)
            .context("the token could not sign the certificate")?;
        let cert = der::certificate(&tbs, &signature);
        session.create_object(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Subject(der::name("LmP")),
            Attribute::Value(cert),
        ])?;
        tracing::info!(%label, id = %hex::encode(id), "RSA-2048 key pair and CN=LmP certificate created on the token");
        Ok(())
    }

    fn certificate(
        &self,
        session: &Session,
        label: &str,
        id: Option<&[u8]>,
    ) -> crate::Result<Vec<u8>> {
        let handle = Self::find(
            session,
            &self.object_template(ObjectClass::CERTIFICATE, label, id),
        )?
        .ok_or_else(|| anyhow!("PKCS#11 certificate not found"))?;
        for a in session.get_attributes(handle, &[AttributeType::Value])? {
            if let Attribute::Value(v) = a {
                return Ok(v);
            }
        }
        bail!("PKCS#11 certificate not found")
    }
}

impl KekProtector for Pkcs11Protector {
    fn token_type(&self) -> &'static str {
        TOKEN_TYPE
    }

    fn preflight(&mut self) -> crate::Result<()> {
        let label = self.config.token_label.clone();
        match self.slot_of(&label)? {
            Some(slot) => {
                if self.context()?.get_token_info(slot)?.user_pin_locked() {
                    bail!(
                        "the PIN of PKCS#11 token \"{label}\" is locked: unlock it with the SO PIN"
                    );
                }
                let session = self.context()?.open_ro_session(slot)?;
                self.login(&session, &label)?;
                self.key_pair_present(&session).map(|_| ())
            }
            None => {
                if self.slot_to_initialise()?.is_none() {
                    return Err(Self::no_slot(&label));
                }
                read_pin(&self.config.pin_file, "PIN")?;
                match &self.config.so_pin_file {
                    Some(p) => read_pin(p, "SO PIN").map(|_| ()),
                    None => bail!(
                        "token \"{label}\" must be initialised but no so_pin_file is configured"
                    ),
                }
            }
        }
    }

    fn seal(&mut self) -> crate::Result<(Secret, SealedKek)> {
        let slot = self.provision()?;
        let label = self.config.token_label.clone();
        let key_label = self.config.key_label.clone();
        let id = self.key_id.clone();
        let session = self.context()?.open_rw_session(slot)?;
        self.login(&session, &label)?;
        let cert = self.certificate(&session, &key_label, Some(&id))?;
        let (n, e) = der::rsa_public_key_of_certificate(&cert)?;
        // Encrypt to the certificate's key, as systemd does; the token does the RSA with a
        // session (non-persistent) copy of that public key.
        let public = session.create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(false),
            Attribute::Encrypt(true),
            Attribute::Modulus(n.clone()),
            Attribute::PublicExponent(e),
        ])?;
        let mut bytes = zeroize::Zeroizing::new(vec![0u8; n.len() * 8 / 16]);
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let secret = Secret::new(bytes.to_vec());
        let encrypted = session.encrypt(&Mechanism::RsaPkcs, public, secret.expose());
        let _ = session.destroy_object(public);
        let encrypted = encrypted.context("the token could not encrypt the KEK secret")?;
        let mut fields = Map::new();
        fields.insert(
            "pkcs11-uri".into(),
            Value::from(format!(
                "pkcs11:token={};object={}",
                percent_encode(&label),
                percent_encode(&key_label)
            )),
        );
        fields.insert(
            "pkcs11-key".into(),
            Value::from(base64::engine::general_purpose::STANDARD.encode(encrypted)),
        );
        tracing::info!(token = %label, "KEK secret encrypted to the token's certificate");
        Ok((secret, SealedKek { fields }))
    }

    fn unseal(&mut self, sealed: &SealedKek) -> crate::Result<Secret> {
        let uri = sealed
            .fields
            .get("pkcs11-uri")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("systemd-pkcs11 token has no pkcs11-uri"))?;
        let uri = Pkcs11Uri::parse(uri)?;
        let encrypted = sealed
            .fields
            .get("pkcs11-key")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("systemd-pkcs11 token has no pkcs11-key"))?;
        let encrypted = base64::engine::general_purpose::STANDARD
            .decode(encrypted)
            .context("pkcs11-key is not base64")?;
        let label = uri
            .token
            .clone()
            .unwrap_or_else(|| self.config.token_label.clone());
        let slot = self.slot_of(&label)?.ok_or_else(|| Self::no_slot(&label))?;
        let session = self.context()?.open_ro_session(slot)?;
        self.login(&session, &label)?;
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        if let Some(object) = &uri.object {
            template.push(Attribute::Label(object.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let key = Self::find(&session, &template)?
            .ok_or_else(|| anyhow!("the private key named by the token is not on \"{label}\""))?;
        // The reference refuses to go on without the certificate beside the key.
        let cert_label = uri
            .object
            .clone()
            .unwrap_or_else(|| self.config.key_label.clone());
        self.certificate(&session, &cert_label, uri.id.as_deref())?;
        let plain = session
            .decrypt(&Mechanism::RsaPkcs, key, &encrypted)
            .context("the token could not decrypt the KEK")?;
        Ok(Secret::new(plain))
    }

    fn can_use(&self, token: &Value) -> bool {
        token.get("type").and_then(Value::as_str) == Some(TOKEN_TYPE)
            && token.get("pkcs11-uri").and_then(Value::as_str).is_some()
            && token.get("pkcs11-key").and_then(Value::as_str).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_like_systemd_writes_them() {
        let uri = Pkcs11Uri::parse("pkcs11:token=lmp;object=luks").expect("parse");
        assert_eq!(uri.token.as_deref(), Some("lmp"));
        assert_eq!(uri.object.as_deref(), Some("luks"));
        let uri = Pkcs11Uri::parse("pkcs11:model=SoftHSM%20v2;token=my%20tok;id=%9D;type=cert")
            .expect("parse");
        assert_eq!(uri.token.as_deref(), Some("my tok"));
        assert_eq!(uri.id, Some(vec![0x9d]));
        assert_eq!(percent_encode("a b"), "a%20b");
    }
}
