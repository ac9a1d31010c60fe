//! The `systemd-tpm2` protector (systemd 252 format): 32 random bytes sealed to a PCR policy
//! under a transient ECC P-256 primary key of the owner hierarchy.
//!
//! swtpm has no resource manager, and neither has a TPM reached through `/dev/tpm0`: every
//! transient object and session made here is flushed, on success and on error alike.

use std::str::FromStr;

use anyhow::{anyhow, bail, Context as _};
use base64::Engine;
use rand::RngCore;
use serde_json::{Map, Value};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{CapabilityType, PropertyTag, SessionType, StartupType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Digest, EccPoint, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder,
    PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SensitiveData, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

use super::{KekProtector, SealedKek};
use crate::config::Tpm2Config;
use crate::secret::Secret;

/// Token type written and read.
pub const TOKEN_TYPE: &str = "systemd-tpm2";
/// Bytes of secret sealed (systemd's choice).
const SECRET_BYTES: usize = 32;
/// Token field pinning the storage primary: lowercase hex of its TPM name (nameAlg || digest of
/// its public area). systemd ignores fields it does not know (design/README.md, TPM bus).
pub const PRIMARY_NAME_FIELD: &str = "cryptfs-tpm2-primary-name";
/// Token field with the PCR values the secret was sealed to: an object of PCR index (decimal
/// string) to lowercase hex value, in the token's bank. Public (PCR values are readable by
/// anyone); systemd ignores it. `status` compares it with the current values.
pub const PCR_VALUES_FIELD: &str = "cryptfs-tpm2-pcr-values";

/// TPM 2.0 protector configured with a TCTI and a PCR policy.
pub struct Tpm2Protector {
    tcti: String,
    pcrs: Vec<u8>,
    bank: HashingAlgorithm,
    bank_name: String,
    /// The efivarfs directory to check Secure Boot in before sealing, when required.
    secure_boot_from: Option<std::path::PathBuf>,
}

impl Tpm2Protector {
    /// A protector for `config` (no TPM access yet).
    pub fn new(config: &Tpm2Config) -> crate::Result<Self> {
        let bank = bank_from_name(&config.pcr_bank)?;
        if let Some(bad) = config.pcrs.iter().find(|p| **p > MAX_PCR) {
            bail!("PCR {bad} does not exist (PCRs are 0-23)");
        }
        Ok(Tpm2Protector {
            tcti: config.tcti.clone(),
            // The lock PCR, when on, is part of every new token's policy (design/boot.md).
            pcrs: config.sealed_pcrs(),
            bank,
            bank_name: config.pcr_bank.clone(),
            secure_boot_from: config
                .requires_secure_boot()
                .then(|| config.efivars_dir.clone()),
        })
    }

    /// Refuses to seal when Secure Boot is required and not enforced (design/README.md).
    fn check_secure_boot(&self) -> crate::Result<()> {
        if let Some(dir) = &self.secure_boot_from {
            crate::secure_boot::require_enforced(dir)?;
        }
        Ok(())
    }

    fn context(&self) -> crate::Result<Context> {
        let conf = TctiNameConf::from_str(&self.tcti)
            .map_err(|e| anyhow!("invalid TPM TCTI {:?}: {e}", self.tcti))?;
        Context::new(conf).map_err(|e| {
            anyhow!(
                "TPM 2.0 unreachable through {:?}: {e} (is the TPM device present and the \
                 TCTI right?)",
                self.tcti
            )
        })
    }

    fn pcr_names(&self) -> String {
        self.pcrs
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("+")
    }

    fn selection(&self, pcrs: &[u8]) -> crate::Result<PcrSelectionList> {
        selection(self.bank, pcrs)
    }
}

/// The highest PCR index of a PC-client TPM.
pub const MAX_PCR: u8 = 23;

/// A PCR bank by its systemd name.
pub fn bank_from_name(name: &str) -> crate::Result<HashingAlgorithm> {
    match name {
        "sha256" => Ok(HashingAlgorithm::Sha256),
        "sha1" => Ok(HashingAlgorithm::Sha1),
        "sha384" => Ok(HashingAlgorithm::Sha384),
        "sha512" => Ok(HashingAlgorithm::Sha512),
        other => bail!(
            "unsupported PCR bank {:?} (use \"sha256\", \"sha1\", \"sha384\" or \"sha512\")",
            other.chars().take(32).collect::<String>()
        ),
    }
}

fn selection(bank: HashingAlgorithm, pcrs: &[u8]) -> crate::Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|&p| {
            // Checked shift: an index from a token is never trusted to be below 32.
            let bit = (p <= MAX_PCR)
                .then(|| 1u32.checked_shl(u32::from(p)))
                .flatten()
                .ok_or_else(|| anyhow!("PCR {p} does not exist (PCRs are 0-{MAX_PCR})"))?;
            PcrSlot::try_from(bit).map_err(|e| anyhow!("PCR {p}: {e}"))
        })
        .collect::<crate::Result<Vec<_>>>()?;
    Ok(PcrSelectionListBuilder::new()
        .with_selection(bank, &slots)
        .build()?)
}

/// The fields of a `systemd-tpm2` token that unsealing uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tpm2Token {
    /// TPM2B_PRIVATE then TPM2B_PUBLIC, as systemd marshals them.
    pub blob: Vec<u8>,
    /// PCR indices of the policy, each 0..=23.
    pub pcrs: Vec<u8>,
    /// The PCR bank the policy was computed over (the token's, not the configuration's).
    pub bank: HashingAlgorithm,
    /// The bank's name as in the token.
    pub bank_name: String,
    /// The storage primary's TPM name recorded at enrollment ([`PRIMARY_NAME_FIELD`]); `None`
    /// for tokens of systemd-cryptenroll or older cryptfs (trusted on first use).
    pub primary_name: Option<Vec<u8>>,
    /// `tpm2-policy-hash`: the policy digest the object was created with, if the token says.
    pub policy_hash: Option<Vec<u8>>,
    /// [`PCR_VALUES_FIELD`]: the PCR values sealed to, ascending, if the token says (cryptfs
    /// tokens since reseal; not systemd's).
    pub sealed_values: Option<Vec<(u8, Vec<u8>)>>,
}

/// The largest `tpm2-blob` accepted: two TPM2B structures of at most 64 KiB each.
pub const MAX_BLOB_BYTES: usize = 2 * (2 + 65535);

impl Tpm2Token {
    /// Parses the sealed fields of a token. Every field from the disk is checked: a missing or
    /// oversized blob, a PCR index that is not a number in 0..=23, an unknown bank are errors.
    /// A missing `tpm2-pcr-bank` is sha256, systemd's default.
    pub fn parse(fields: &Map<String, Value>) -> crate::Result<Tpm2Token> {
        let blob = fields
            .get("tpm2-blob")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("systemd-tpm2 token has no tpm2-blob"))?;
        if blob.len() > MAX_BLOB_BYTES.div_ceil(3) * 4 {
            bail!(
                "tpm2-blob of the systemd-tpm2 token is too large ({} characters)",
                blob.len()
            );
        }
        let blob = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .context("tpm2-blob is not base64")?;
        let (_, rest) = split_tpm2b(&blob)?;
        split_tpm2b(rest)?;
        let pcrs = match fields.get("tpm2-pcrs") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|n| *n <= u64::from(MAX_PCR))
                        .and_then(|n| u8::try_from(n).ok())
                        .ok_or_else(|| {
                            anyhow!(
                                "systemd-tpm2 token: PCR {} does not exist (PCRs are \
                                 0-{MAX_PCR})",
                                v.to_string().chars().take(24).collect::<String>()
                            )
                        })
                })
                .collect::<crate::Result<Vec<u8>>>()?,
            Some(_) => bail!("tpm2-pcrs of the systemd-tpm2 token is not a list"),
        };
        let bank_name = match fields.get("tpm2-pcr-bank") {
            None => "sha256".to_string(),
            Some(Value::String(name)) => name.clone(),
            Some(_) => bail!("tpm2-pcr-bank of the systemd-tpm2 token is not a string"),
        };
        let bank = bank_from_name(&bank_name).context("systemd-tpm2 token")?;
        let primary_name = match fields.get(PRIMARY_NAME_FIELD) {
            None => None,
            // A TPM name is a 2-byte algorithm then a digest: at most 2 + 64 bytes.
            Some(Value::String(text)) if text.len() <= 2 * 66 => {
                Some(hex::decode(text).map_err(|_| {
                    anyhow!("{PRIMARY_NAME_FIELD} of the systemd-tpm2 token is not hex")
                })?)
            }
            Some(_) => {
                bail!("{PRIMARY_NAME_FIELD} of the systemd-tpm2 token is not a TPM name in hex")
            }
        };
        // Neither field is needed to unseal (the TPM checks the policy): a malformed one is
        // ignored rather than making the token unusable, and bounded before it is decoded.
        let policy_hash = fields
            .get("tpm2-policy-hash")
            .and_then(Value::as_str)
            .filter(|text| text.len() <= 2 * MAX_DIGEST_BYTES)
            .and_then(|text| hex::decode(text).ok());
        let sealed_values = fields
            .get(PCR_VALUES_FIELD)
            .and_then(Value::as_object)
            .filter(|map| map.len() <= usize::from(MAX_PCR) + 1)
            .and_then(|map| {
                let mut values = map
                    .iter()
                    .map(|(key, value)| {
                        let pcr = key.parse::<u8>().ok().filter(|p| *p <= MAX_PCR)?;
                        let value = value
                            .as_str()
                            .filter(|v| v.len() <= 2 * MAX_DIGEST_BYTES)
                            .and_then(|v| hex::decode(v).ok())?;
                        Some((pcr, value))
                    })
                    .collect::<Option<Vec<_>>>()?;
                values.sort_by_key(|(p, _)| *p);
                Some(values)
            });
        Ok(Tpm2Token {
            blob,
            pcrs,
            bank,
            bank_name,
            primary_name,
            policy_hash,
            sealed_values,
        })
    }

    /// The policy digest in the sealed object's public area (what the TPM will demand), read
    /// from the blob; `None` when the public area is no keyed-hash object.
    pub fn object_policy(&self) -> crate::Result<Option<Vec<u8>>> {
        let (_, rest) = split_tpm2b(&self.blob)?;
        let (public, _) = split_tpm2b(rest)?;
        let public = Public::unmarshall(public).context("tpm2-blob: public area")?;
        Ok(match public {
            Public::KeyedHash { auth_policy, .. } => Some(auth_policy.value().to_vec()),
            _ => None,
        })
    }
}

/// The largest digest of a supported bank (SHA-512).
const MAX_DIGEST_BYTES: usize = 64;

/// The storage primary key template of systemd 252: ECC NIST P-256, AES-128-CFB, NULL scheme
/// and KDF, empty unique. Deterministic for a given owner seed, so it is re-created on demand.
fn primary_template() -> crate::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_restricted(true)
        .with_decrypt(true)
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .build()?;
    Ok(PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()?)
}

/// Transient handles to flush whatever happens.
#[derive(Default)]
struct Flush(Vec<ObjectHandle>);

impl Flush {
    /// Flushes one handle now, before the next session starts: a TPM reached without a
    /// resource manager (swtpm, a raw `/dev/tpm0`) has three session slots, and another
    /// client may have left sessions in some of them.
    fn now(&mut self, ctx: &mut Context, handle: ObjectHandle) {
        self.0.retain(|h| *h != handle);
        if let Err(e) = ctx.flush_context(handle) {
            tracing::warn!("could not flush a TPM handle: {e}");
        }
    }

    fn all(self, ctx: &mut Context) {
        for handle in self.0 {
            if let Err(e) = ctx.flush_context(handle) {
                tracing::warn!("could not flush a TPM handle: {e}");
            }
        }
    }
}

/// The storage primary and its TPM name. ESAPI computes the name from the public area the TPM
/// returned and checks it against the name the TPM returned with it, so the name identifies the
/// very key the salt of every later session is encrypted to (the pin, [`PRIMARY_NAME_FIELD`]).
fn create_primary(ctx: &mut Context, flush: &mut Flush) -> crate::Result<(KeyHandle, Vec<u8>)> {
    let template = primary_template()?;
    // CreatePrimary is authorized by the owner hierarchy, which is exempt from DA protection.
    let primary = ctx
        .execute_with_nullauth_session(|ctx| {
            ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .context("TPM could not create the storage primary key")?;
    flush.0.push(primary.key_handle.into());
    let name = ctx
        .tr_get_name(primary.key_handle.into())
        .context("TPM: no name for the storage primary key")?;
    Ok((primary.key_handle, name.value().to_vec()))
}

/// Whether sessions are salted and encrypt their parameters. Only a test build can turn it off,
/// to show that the bus test sees the secret when they are not (tests/tpm_bus.rs).
fn protect_bus() -> bool {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os("CRYPTFS_TEST_TPM_CLEARTEXT_SESSIONS").is_some() {
        return false;
    }
    true
}

/// A session of `kind`, salted with `salt_key` (the storage primary) when one is given: the
/// session key then derives from a salt only that key's TPM can decrypt, so an interposer on
/// the bus cannot compute it. `encrypt`/`decrypt` turn on parameter encryption of the first
/// response/command parameter (the unsealed data; the sealed object's sensitive part).
fn start_session(
    ctx: &mut Context,
    kind: SessionType,
    salt_key: Option<KeyHandle>,
    (decrypt, encrypt): (bool, bool),
    flush: &mut Flush,
) -> crate::Result<AuthSession> {
    let salt_key = salt_key.filter(|_| protect_bus());
    let session = ctx
        .start_auth_session(
            salt_key,
            None,
            None,
            kind,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )?
        .ok_or_else(|| anyhow!("TPM returned no session handle"))?;
    flush.0.push(SessionHandle::from(session).into());
    if salt_key.is_some() && (decrypt || encrypt) {
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(decrypt)
            .with_encrypt(encrypt)
            .build();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .context("TPM session: parameter encryption not accepted")?;
    }
    Ok(session)
}

/// TPM2B framing: a big-endian u16 size, then the bytes.
fn tpm2b(bytes: &[u8]) -> crate::Result<Vec<u8>> {
    let len = u16::try_from(bytes.len()).context("TPM2B too large")?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    Ok(out)
}

fn split_tpm2b(bytes: &[u8]) -> crate::Result<(&[u8], &[u8])> {
    if bytes.len() < 2 {
        bail!("truncated tpm2-blob");
    }
    let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    if bytes.len() < 2 + len {
        bail!("truncated tpm2-blob");
    }
    Ok((&bytes[2..2 + len], &bytes[2 + len..]))
}

/// The DA lockout error, with the TPM's own counter, limit and recovery times and how to clear
/// it. Read after the TPM answered TPM_RC_LOCKOUT; reading properties needs no authorization.
fn lockout_error(ctx: &mut Context, what: &str) -> anyhow::Error {
    let mut props = |tag: PropertyTag| -> Option<u32> {
        match ctx.get_capability(CapabilityType::TpmProperties, tag.into(), 1) {
            Ok((CapabilityData::TpmProperties(list), _)) => list.find(tag).map(|p| p.value()),
            _ => None,
        }
    };
    let show = |v: Option<u32>| v.map_or_else(|| "unknown".to_string(), |v| v.to_string());
    let counter = show(props(PropertyTag::LockoutCounter));
    let max = show(props(PropertyTag::MaxAuthFail));
    let interval = show(props(PropertyTag::LockoutInterval));
    let recovery = show(props(PropertyTag::LockoutRecovery));
    anyhow!(
        "the TPM is in dictionary-attack (DA) lockout and refused to {what}: failed \
         authorizations counted {counter} of at most {max} (cryptfs' own use never counts: \
         the failures are someone else's, e.g. wrong PINs, or power cuts while a DA-protected \
         key was in use). It recovers by itself: one failure is forgotten every {interval} s of \
         TPM uptime; or clear it at once with the lockout authorization: \
         `tpm2_dictionarylockout --clear-lockout` (lockout-auth recovery time {recovery} s)"
    )
}

fn is_lockout(e: &tss_esapi::Error) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(Tss2ResponseCodeKind::Lockout))
}

/// Ends the TPM's "DA-protected authorization used" state after cryptfs' last command.
///
/// systemd 252's storage primary has no `noDA` attribute and its template cannot change (the
/// primary is re-created from it; another template is another key, and systemd 252 could not
/// load the sealed object any more). Every TPM2_Create and TPM2_Load under it authorizes it,
/// and a TPM (libtpms `CheckLockedOut`, the reference code) then records "DA used" in NV;
/// at the next TPM2_Startup after a power cut it counts one failed try, so three power cuts
/// during boot lock a TPM with default limits out. TPM2_Shutdown(CLEAR) clears that state
/// (`TPM2_Shutdown` resets `g_daUsed`) without touching anything else a running system
/// needs: PCRs, sessions, objects stay; any later DA-protected use sets it again, so no one
/// else's failed authorization escapes counting. Called right after the one command that
/// authorizes the primary (TPM2_Create, TPM2_Load): what remains is the window between that
/// command and this one.
fn end_da_use(ctx: &mut Context) {
    if let Err(e) = ctx.shutdown(StartupType::Clear) {
        tracing::warn!(
            "TPM2_Shutdown(CLEAR) after use failed ({e}): a power cut before the next orderly \
             shutdown counts as a failed authorization against the TPM's DA limit"
        );
    }
}

/// Runs `command`, the one command that authorizes the DA-protected primary (in `session`),
/// then ends the "DA used" state at once, succeeded or not (the authorization is checked
/// before the command runs). A lockout answer becomes the lockout report; any other error
/// goes through `other`.
fn authorizing_primary<T>(
    ctx: &mut Context,
    session: AuthSession,
    what: &str,
    command: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    other: impl FnOnce(tss_esapi::Error) -> anyhow::Error,
) -> crate::Result<T> {
    let result = ctx.execute_with_session(Some(session), command);
    end_da_use(ctx);
    result.map_err(|e| {
        if is_lockout(&e) {
            lockout_error(ctx, what)
        } else {
            other(e)
        }
    })
}

impl Tpm2Protector {
    fn seal_inner(
        &self,
        ctx: &mut Context,
        flush: &mut Flush,
        secret: &[u8],
        policy: Digest,
    ) -> crate::Result<(Vec<u8>, Vec<u8>)> {
        let (primary, primary_name) = create_primary(ctx, flush)?;
        // noDA as systemd >= 256: the object's policy needs no authValue, so it is never
        // DA-checked; the flag says so to every TPM and tool. systemd 252 unseals it
        // (tests/systemd_compat.rs).
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .build()?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_auth_policy(policy.clone())
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()?;
        let sensitive = SensitiveData::try_from(secret.to_vec())?;
        // The secret travels in TPM2_Create's first parameter (inSensitive): the session
        // authorizing the primary is salted with it and encrypts that parameter.
        let session = start_session(ctx, SessionType::Hmac, Some(primary), (true, false), flush)?;
        let created = authorizing_primary(
            ctx,
            session,
            "seal the KEK secret",
            |ctx| ctx.create(primary, template, None, Some(sensitive), None, None),
            |e| anyhow!("TPM could not seal the KEK secret: {e}"),
        )?;
        let mut blob = tpm2b(created.out_private.value())?;
        blob.extend(tpm2b(&created.out_public.marshall()?)?);
        Ok((blob, primary_name))
    }

    fn unseal_inner(
        &self,
        ctx: &mut Context,
        flush: &mut Flush,
        token: &Tpm2Token,
    ) -> crate::Result<Vec<u8>> {
        let pcrs = &token.pcrs;
        let (private, rest) = split_tpm2b(&token.blob)?;
        let (public, _) = split_tpm2b(rest)?;
        let private = Private::try_from(private.to_vec())?;
        let public = Public::unmarshall(public)?;
        let (primary, primary_name) = create_primary(ctx, flush)?;
        // Before any command that carries the secret: the key the sessions are salted with
        // must be the one enrollment saw, or an interposer could have answered with its own.
        match &token.primary_name {
            Some(pinned) if *pinned != primary_name => bail!(
                "the TPM's storage primary key differs from the one the KEK was sealed under \
                 (name {} at enrollment, {} now): another TPM, a cleared owner hierarchy, or \
                 something between cryptfs and the TPM; nothing secret was sent",
                hex::encode(pinned),
                hex::encode(&primary_name)
            ),
            Some(_) => {}
            None => tracing::info!(
                "systemd-tpm2 token has no {PRIMARY_NAME_FIELD}: trusting this TPM's storage \
                 primary on first use"
            ),
        }
        let session = start_session(ctx, SessionType::Hmac, Some(primary), (false, false), flush)?;
        // TPM2_Unseal's pure PolicyPCR session is never DA-checked: the "DA used" state ends
        // before it.
        let object = authorizing_primary(
            ctx,
            session,
            "load the sealed KEK",
            |ctx| ctx.load(primary, private, public),
            |e| anyhow!("TPM refused to load the sealed KEK (made by another TPM?): {e}"),
        )?;
        flush.0.push(object.into());
        flush.now(ctx, SessionHandle::from(session).into());
        // The policy is recomputed over the token's bank: the one it was sealed with. The
        // policy session is salted and encrypts TPM2_Unseal's response (the secret).
        let selection = selection(token.bank, pcrs)?;
        let session = start_session(
            ctx,
            SessionType::Policy,
            Some(primary),
            (false, true),
            flush,
        )?;
        let policy = PolicySession::try_from(session)?;
        ctx.policy_pcr(policy, Digest::default(), selection)?;
        let data = ctx
            .execute_with_session(Some(session), |ctx| ctx.unseal(object.into()))
            .map_err(|e| {
                anyhow!(
                    "TPM refused to unseal the KEK: PCR {} (bank {}) differs from enrollment \
                     ({e})",
                    pcrs.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("+"),
                    token.bank_name
                )
            })?;
        Ok(data.value().to_vec())
    }
}

impl KekProtector for Tpm2Protector {
    fn token_type(&self) -> &'static str {
        TOKEN_TYPE
    }

    fn preflight(&mut self) -> crate::Result<()> {
        self.check_secure_boot()?;
        let mut ctx = self.context()?;
        let mut flush = Flush::default();
        let result = create_primary(&mut ctx, &mut flush)
            .and_then(|_| self.selection(&self.pcrs).map(|_| ()));
        flush.all(&mut ctx);
        result.with_context(|| format!("TPM 2.0 at {:?} is not usable", self.tcti))
    }

    fn seal(&mut self) -> crate::Result<(Secret, SealedKek)> {
        let values = self.read_pcrs(&self.bank_name, &self.pcrs)?;
        self.seal_to(&values)
    }

    fn unseal(&mut self, sealed: &SealedKek) -> crate::Result<Secret> {
        let token = Tpm2Token::parse(&sealed.fields)?;
        let mut ctx = self.context()?;
        let mut flush = Flush::default();
        let data = self.unseal_inner(&mut ctx, &mut flush, &token);
        flush.all(&mut ctx);
        Ok(Secret::new(data?))
    }

    fn can_use(&self, token: &Value) -> bool {
        token.get("type").and_then(Value::as_str) == Some(TOKEN_TYPE)
            && token.get("tpm2-pin").and_then(Value::as_bool) != Some(true)
            && token.get("tpm2_srk").is_none()
            && token
                .get("tpm2-primary-alg")
                .and_then(Value::as_str)
                .is_none_or(|a| a == "ecc")
    }
}

/// PCR access for the boot-phase lock, `reseal` and `status` (design/boot.md). Added beside
/// the protector's seal/unseal; it reuses their context, session and flush helpers.
impl Tpm2Protector {
    /// The PCRs the protector seals to, as configured (the lock PCR, when on, is included by
    /// the configuration's [`Tpm2Config::sealed_pcrs`](crate::config::Tpm2Config::sealed_pcrs)).
    pub fn pcrs(&self) -> &[u8] {
        &self.pcrs
    }

    /// Reads the values of `pcrs` in the bank `bank_name`, as (index, value) in ascending index
    /// order.
    pub fn read_pcrs(&self, bank_name: &str, pcrs: &[u8]) -> crate::Result<Vec<(u8, Vec<u8>)>> {
        let bank = bank_from_name(bank_name)?;
        let mut ctx = self.context()?;
        let mut sorted = pcrs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out = Vec::new();
        // TPM2_PCR_Read returns at most 8 digests per call: one PCR at a time keeps it simple.
        for pcr in sorted {
            let (_, _, digests) = ctx
                .pcr_read(selection(bank, &[pcr])?)
                .with_context(|| format!("TPM could not read PCR {pcr} ({bank_name})"))?;
            let value = digests
                .value()
                .first()
                .ok_or_else(|| anyhow!("TPM has no PCR {pcr} in the {bank_name} bank"))?;
            out.push((pcr, value.value().to_vec()));
        }
        Ok(out)
    }

    /// Seals a new secret to the given PCR values (every PCR of the configured policy, in the
    /// configured bank), which need not be the TPM's current ones: the policy digest is
    /// computed in software ([`super::tpm2_policy`]), so `reseal` can seal after the boot-phase
    /// lock and for a predicted PCR 7. The values go in [`PCR_VALUES_FIELD`] so that `status`
    /// can say which PCR changed when the token is refused.
    pub fn seal_to(&mut self, values: &[(u8, Vec<u8>)]) -> crate::Result<(Secret, SealedKek)> {
        self.check_secure_boot()?;
        let mut given: Vec<u8> = values.iter().map(|(p, _)| *p).collect();
        given.sort_unstable();
        if given != self.pcrs {
            bail!(
                "internal error: values for PCR {given:?} given, the policy is PCR {:?}",
                self.pcrs
            );
        }
        let policy = super::tpm2_policy::policy_pcr_digest(&self.bank_name, values)?;
        let mut bytes = zeroize::Zeroizing::new(vec![0u8; SECRET_BYTES]);
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let secret = Secret::new(bytes.to_vec());
        let mut ctx = self.context()?;
        let mut flush = Flush::default();
        let sealed = self.seal_inner(
            &mut ctx,
            &mut flush,
            secret.expose(),
            Digest::try_from(policy.to_vec())?,
        );
        flush.all(&mut ctx);
        let (blob, primary_name) = sealed?;
        let mut fields = Map::new();
        fields.insert(
            "tpm2-blob".into(),
            Value::from(base64::engine::general_purpose::STANDARD.encode(blob)),
        );
        fields.insert(
            "tpm2-pcrs".into(),
            Value::from(self.pcrs.iter().map(|p| u32::from(*p)).collect::<Vec<_>>()),
        );
        fields.insert("tpm2-pcr-bank".into(), Value::from(self.bank_name.clone()));
        fields.insert("tpm2-primary-alg".into(), Value::from("ecc"));
        fields.insert("tpm2-policy-hash".into(), Value::from(hex::encode(policy)));
        fields.insert("tpm2-pin".into(), Value::from(false));
        fields.insert(
            PRIMARY_NAME_FIELD.into(),
            Value::from(hex::encode(primary_name)),
        );
        let mut sealed_values = Map::new();
        for (pcr, value) in values {
            sealed_values.insert(pcr.to_string(), Value::from(hex::encode(value)));
        }
        fields.insert(PCR_VALUES_FIELD.into(), Value::Object(sealed_values));
        tracing::info!(pcrs = %self.pcr_names(), "KEK secret sealed by the TPM");
        Ok((secret, SealedKek { fields }))
    }

    /// Extends `pcr` of the sha256 bank with `measurement` (32 bytes).
    pub fn extend_pcr(&self, pcr: u8, measurement: &[u8; 32]) -> crate::Result<()> {
        use tss_esapi::handles::PcrHandle;
        use tss_esapi::structures::DigestValues;
        let handle = PcrHandle::try_from(u32::from(pcr))
            .map_err(|e| anyhow!("PCR {pcr} cannot be extended: {e}"))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(measurement.to_vec())?,
        );
        let mut ctx = self.context()?;
        ctx.execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .with_context(|| format!("TPM could not extend PCR {pcr}"))
    }

    /// The PolicyPCR digest the TPM computes in a trial session over the current values of
    /// `pcrs` in `bank_name` (the cross-check of [`super::tpm2_policy`]).
    pub fn trial_policy(&self, bank_name: &str, pcrs: &[u8]) -> crate::Result<Vec<u8>> {
        let bank = bank_from_name(bank_name)?;
        let mut ctx = self.context()?;
        let mut flush = Flush::default();
        let result = (|| {
            let trial = start_session(
                &mut ctx,
                SessionType::Trial,
                None,
                (false, false),
                &mut flush,
            )?;
            let trial = PolicySession::try_from(trial)?;
            ctx.policy_pcr(trial, Digest::default(), selection(bank, pcrs)?)?;
            Ok(ctx.policy_get_digest(trial)?.value().to_vec())
        })();
        flush.all(&mut ctx);
        result
    }
}
