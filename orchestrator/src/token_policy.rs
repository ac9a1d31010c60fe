//! Whether a `systemd-tpm2` token's PCR policy is satisfied by this boot's PCR values: what
//! `status` shows for each token (so an operator sees which PCR changed when the TPM refuses),
//! and what `reseal --finish` keeps.
//!
//! "This boot's values" are the current ones, except the boot-phase lock PCR, which is taken
//! at its pre-lock value once the lock has been extended: a token is judged by whether it
//! unseals at the start of a boot like this one, not by whether it unseals now (after the
//! lock, none does, by design). The comparison is made in software against the policy digest
//! of the sealed object's public area (what the TPM demands), so it needs only `PCR_Read`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::kek::tpm2::{Tpm2Protector, Tpm2Token, TOKEN_TYPE};
use crate::kek::tpm2_policy::policy_pcr_digest;
use crate::kek::SealedKek;
use crate::luks::metadata::Luks2Metadata;

/// PCR values of this boot, by (bank, PCR).
#[derive(Debug, Clone, Default)]
pub struct BootPcrs {
    /// Values read from the TPM now.
    pub current: BTreeMap<(String, u8), Vec<u8>>,
    /// The lock PCR and its pre-lock value, when the lock was extended in this boot.
    pub pre_lock: Option<(u8, Vec<u8>)>,
}

impl BootPcrs {
    /// The value `pcr` of `bank` had when this boot's initramfs unsealed.
    pub fn at_boot(&self, bank: &str, pcr: u8) -> Option<&[u8]> {
        match &self.pre_lock {
            Some((lock, value)) if *lock == pcr && bank == "sha256" => Some(value),
            _ => self
                .current
                .get(&(bank.to_string(), pcr))
                .map(Vec::as_slice),
        }
    }

    /// Reads every PCR the `systemd-tpm2` tokens of `meta` name, in their banks, and takes the
    /// lock PCR's pre-lock value of this boot from `pre_lock`.
    pub fn read(
        tpm: &Tpm2Protector,
        meta: &Luks2Metadata,
        pre_lock: Option<(u8, Vec<u8>)>,
    ) -> crate::Result<BootPcrs> {
        let mut wanted: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for token in tpm2_tokens(meta) {
            let Ok(parsed) = Tpm2Token::parse(&token.1.fields) else {
                continue;
            };
            wanted
                .entry(parsed.bank_name)
                .or_default()
                .extend(parsed.pcrs);
        }
        let mut current = BTreeMap::new();
        for (bank, pcrs) in wanted {
            for (pcr, value) in tpm.read_pcrs(&bank, &pcrs)? {
                current.insert((bank.clone(), pcr), value);
            }
        }
        Ok(BootPcrs { current, pre_lock })
    }
}

/// The `systemd-tpm2` tokens of `meta`: (token id, sealed form).
pub fn tpm2_tokens(meta: &Luks2Metadata) -> Vec<(u32, SealedKek)> {
    meta.tokens
        .iter()
        .filter(|(_, t)| t.kind == TOKEN_TYPE)
        .filter_map(|(id, t)| Some((*id, SealedKek::from_token(&t.json)?)))
        .collect()
}

/// One PCR of a token's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PcrComparison {
    /// Index.
    pub pcr: u8,
    /// The value sealed to (from the token's `cryptfs-tpm2-pcr-values`), if recorded.
    pub sealed: Option<String>,
    /// This boot's value (the lock PCR at its pre-lock value).
    pub boot: Option<String>,
    /// `Some(true)` when both are known and differ.
    pub changed: Option<bool>,
}

/// A `systemd-tpm2` token judged against this boot's PCR values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenPolicy {
    /// LUKS2 token id.
    pub token: u32,
    /// PCR bank.
    pub bank: String,
    /// The policy digest the sealed object demands (hex).
    pub policy: Option<String>,
    /// The digest this boot's values give (hex).
    pub boot_policy: Option<String>,
    /// Whether the two match: the token unseals at the start of a boot like this one.
    pub unseals: Option<bool>,
    /// Per PCR: what it was sealed to and what it is.
    pub pcrs: Vec<PcrComparison>,
    /// Why the token could not be judged.
    pub error: Option<String>,
}

/// Judges the sealed form of token `token` against `boot`.
pub fn judge(token: u32, sealed: &SealedKek, boot: &BootPcrs) -> TokenPolicy {
    let mut out = TokenPolicy {
        token,
        bank: String::new(),
        policy: None,
        boot_policy: None,
        unseals: None,
        pcrs: Vec::new(),
        error: None,
    };
    let parsed = match Tpm2Token::parse(&sealed.fields) {
        Ok(parsed) => parsed,
        Err(e) => {
            out.error = Some(format!("{e:#}"));
            return out;
        }
    };
    out.bank = parsed.bank_name.clone();
    let demanded = match parsed.object_policy() {
        Ok(Some(policy)) => Some(policy),
        Ok(None) | Err(_) => parsed.policy_hash.clone(),
    };
    out.policy = demanded.as_ref().map(hex::encode);
    let sealed_values: BTreeMap<u8, &Vec<u8>> = parsed
        .sealed_values
        .iter()
        .flatten()
        .map(|(p, v)| (*p, v))
        .collect();
    let mut values = Vec::new();
    for pcr in &parsed.pcrs {
        let now = boot.at_boot(&parsed.bank_name, *pcr);
        if let Some(v) = now {
            values.push((*pcr, v.to_vec()));
        }
        let sealed = sealed_values.get(pcr);
        out.pcrs.push(PcrComparison {
            pcr: *pcr,
            sealed: sealed.map(hex::encode),
            boot: now.map(hex::encode),
            changed: match (sealed, now) {
                (Some(s), Some(n)) => Some(s.as_slice() != n),
                _ => None,
            },
        });
    }
    if values.len() != parsed.pcrs.len() {
        out.error = Some("the TPM did not give a value for every PCR of the policy".into());
        return out;
    }
    match policy_pcr_digest(&parsed.bank_name, &values) {
        Ok(digest) => {
            out.boot_policy = Some(hex::encode(digest));
            out.unseals = demanded.map(|d| d.as_slice() == digest.as_slice());
        }
        Err(e) => out.error = Some(format!("{e:#}")),
    }
    out
}

/// The PCRs whose change explains a refusal, for messages: `PCR 7` or `PCR 7+15`.
pub fn changed_pcrs(policy: &TokenPolicy) -> Option<String> {
    let changed: Vec<String> = policy
        .pcrs
        .iter()
        .filter(|c| c.changed == Some(true))
        .map(|c| c.pcr.to_string())
        .collect();
    (!changed.is_empty()).then(|| format!("PCR {}", changed.join("+")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use serde_json::{json, Map, Value};

    /// A token whose blob's public area is no TPM structure (so the policy comes from
    /// `tpm2-policy-hash`), sealed to `sealed` for `pcrs`.
    fn token(pcrs: &[u8], sealed: &[(u8, Vec<u8>)]) -> SealedKek {
        let blob = [0u8, 2, 1, 1, 0, 2, 9, 9];
        let policy = policy_pcr_digest("sha256", sealed).expect("digest");
        let mut values = Map::new();
        for (pcr, v) in sealed {
            values.insert(pcr.to_string(), Value::from(hex::encode(v)));
        }
        let mut fields = Map::new();
        fields.insert(
            "tpm2-blob".into(),
            Value::from(base64::engine::general_purpose::STANDARD.encode(blob)),
        );
        fields.insert("tpm2-pcrs".into(), json!(pcrs));
        fields.insert("tpm2-pcr-bank".into(), json!("sha256"));
        fields.insert("tpm2-policy-hash".into(), json!(hex::encode(policy)));
        fields.insert(
            crate::kek::tpm2::PCR_VALUES_FIELD.into(),
            Value::Object(values),
        );
        SealedKek { fields }
    }

    fn boot(values: &[(u8, Vec<u8>)], pre_lock: Option<(u8, Vec<u8>)>) -> BootPcrs {
        BootPcrs {
            current: values
                .iter()
                .map(|(p, v)| (("sha256".to_string(), *p), v.clone()))
                .collect(),
            pre_lock,
        }
    }

    #[test]
    fn a_token_matches_the_values_it_was_sealed_to_and_names_the_pcr_that_changed() {
        let sealed = token(&[7], &[(7, vec![1; 32])]);
        let same = judge(0, &sealed, &boot(&[(7, vec![1; 32])], None));
        assert_eq!(same.unseals, Some(true), "{same:?}");
        assert_eq!(same.pcrs[0].changed, Some(false));
        assert_eq!(changed_pcrs(&same), None);
        let moved = judge(0, &sealed, &boot(&[(7, vec![2; 32])], None));
        assert_eq!(moved.unseals, Some(false));
        assert_eq!(moved.pcrs[0].changed, Some(true));
        assert_eq!(changed_pcrs(&moved).as_deref(), Some("PCR 7"));
    }

    #[test]
    fn after_the_lock_the_lock_pcr_is_judged_at_its_pre_lock_value() {
        let sealed = token(&[7, 15], &[(7, vec![1; 32]), (15, vec![0; 32])]);
        let locked_now = [(7, vec![1; 32]), (15, vec![5; 32])];
        let without = judge(0, &sealed, &boot(&locked_now, None));
        assert_eq!(without.unseals, Some(false));
        let with = judge(0, &sealed, &boot(&locked_now, Some((15, vec![0; 32]))));
        assert_eq!(with.unseals, Some(true), "{with:?}");
    }

    #[test]
    fn a_missing_pcr_value_or_a_broken_token_is_reported_not_guessed() {
        let sealed = token(&[7], &[(7, vec![1; 32])]);
        let none = judge(0, &sealed, &boot(&[], None));
        assert_eq!(none.unseals, None);
        assert!(none.error.is_some());
        let broken = SealedKek { fields: Map::new() };
        let judged = judge(3, &broken, &boot(&[], None));
        assert!(judged.error.is_some() && judged.unseals.is_none());
    }
}
