//! The TPM2 PolicyPCR digest computed in software, for *given* PCR values.
//!
//! A trial session on the TPM computes the policy over the PCR values the TPM holds now. After
//! the boot-phase lock (design/boot.md) the lock PCR no longer holds the value the next boot
//! will have, so `reseal` and `status` need the digest for values that are not (or no longer)
//! in the TPM: the predicted PCR 7 of a planned firmware update, the lock PCR's recorded
//! pre-lock value. TPM2_Create does not check PCRs, so an object sealed with this digest as its
//! authPolicy unseals exactly when the PCRs hold these values.
//!
//! Per TPM 2.0 Part 3, TPM2_PolicyPCR:
//! `policyDigest' = H(policyDigest ‖ TPM_CC_PolicyPCR ‖ TPML_PCR_SELECTION ‖ pcrDigest)` with
//! `pcrDigest = H(value of each selected PCR, in ascending index order)`, H being the session's
//! hash (SHA-256 here, as systemd's sessions), whatever the PCR bank.

use anyhow::{bail, ensure};
use sha2::{Digest as _, Sha256};

/// TPM_CC_PolicyPCR.
const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
/// Bytes of a PC-client PCR bitmap (PCRs 0-23).
const PCR_SELECT_BYTES: u8 = 3;

/// TPM_ALG_ID of a PCR bank by its systemd name.
pub fn bank_alg_id(bank: &str) -> crate::Result<u16> {
    Ok(match bank {
        "sha1" => 0x0004,
        "sha256" => 0x000B,
        "sha384" => 0x000C,
        "sha512" => 0x000D,
        other => bail!(
            "unsupported PCR bank {:?}",
            other.chars().take(32).collect::<String>()
        ),
    })
}

/// Digest size of a PCR bank's values.
pub fn bank_digest_len(bank: &str) -> crate::Result<usize> {
    Ok(match bank {
        "sha1" => 20,
        "sha256" => 32,
        "sha384" => 48,
        "sha512" => 64,
        other => bail!(
            "unsupported PCR bank {:?}",
            other.chars().take(32).collect::<String>()
        ),
    })
}

/// The marshalled TPML_PCR_SELECTION of one bank and `pcrs` (count, then one
/// TPMS_PCR_SELECTION: hash, sizeofSelect = 3, the bitmap).
pub fn marshal_selection(bank: &str, pcrs: &[u8]) -> crate::Result<Vec<u8>> {
    let mut bitmap = [0u8; PCR_SELECT_BYTES as usize];
    for &pcr in pcrs {
        ensure!(
            pcr <= super::tpm2::MAX_PCR,
            "PCR {pcr} does not exist (PCRs are 0-{})",
            super::tpm2::MAX_PCR
        );
        bitmap[usize::from(pcr / 8)] |= 1 << (pcr % 8);
    }
    let mut out = 1u32.to_be_bytes().to_vec();
    out.extend_from_slice(&bank_alg_id(bank)?.to_be_bytes());
    out.push(PCR_SELECT_BYTES);
    out.extend_from_slice(&bitmap);
    Ok(out)
}

/// The PolicyPCR digest (starting from the all-zero digest of a fresh session) for `values`:
/// (PCR index, value in `bank`). Order and duplicates in `values` do not matter: the TPM
/// hashes the selected PCRs in ascending index order; a PCR given twice is an error.
pub fn policy_pcr_digest(bank: &str, values: &[(u8, Vec<u8>)]) -> crate::Result<[u8; 32]> {
    let len = bank_digest_len(bank)?;
    let mut sorted: Vec<&(u8, Vec<u8>)> = values.iter().collect();
    sorted.sort_by_key(|(pcr, _)| *pcr);
    let mut pcr_digest = Sha256::new();
    for pair in sorted.windows(2) {
        ensure!(pair[0].0 != pair[1].0, "PCR {} given twice", pair[0].0);
    }
    for (pcr, value) in &sorted {
        ensure!(
            value.len() == len,
            "PCR {pcr}: a {bank} value is {len} bytes, got {}",
            value.len()
        );
        pcr_digest.update(value);
    }
    let pcrs: Vec<u8> = sorted.iter().map(|(pcr, _)| *pcr).collect();
    let mut policy = Sha256::new();
    policy.update([0u8; 32]);
    policy.update(TPM_CC_POLICY_PCR.to_be_bytes());
    policy.update(marshal_selection(bank, &pcrs)?);
    policy.update(pcr_digest.finalize());
    Ok(policy.finalize().into())
}

/// The value a PCR of `bank` holds after extending `value` with `measurement` (already a
/// digest of the bank's size): `H_bank(value ‖ measurement)`. Only SHA-256 is supported: the
/// lock's prediction is made for the bank the token uses, and cryptfs writes sha256 tokens.
pub fn extended(bank: &str, value: &[u8], measurement: &[u8]) -> crate::Result<Vec<u8>> {
    ensure!(
        bank == "sha256",
        "predicting an extend of the {bank} bank is not supported (use pcr_bank = \"sha256\")"
    );
    let mut h = Sha256::new();
    h.update(value);
    h.update(measurement);
    Ok(h.finalize().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_marshals_as_the_tpm_does() {
        // PCR 7 and 15 of sha256: count 1, TPM_ALG_SHA256, 3 bytes, bits 7 and 15.
        assert_eq!(
            marshal_selection("sha256", &[7, 15]).expect("valid"),
            vec![0, 0, 0, 1, 0x00, 0x0B, 3, 0x80, 0x80, 0x00]
        );
        assert_eq!(
            marshal_selection("sha1", &[0, 23]).expect("valid"),
            vec![0, 0, 0, 1, 0x00, 0x04, 3, 0x01, 0x00, 0x80]
        );
        assert!(marshal_selection("sha256", &[24]).is_err());
        assert!(marshal_selection("md5", &[7]).is_err());
    }

    #[test]
    fn digest_is_the_specified_hash_chain() {
        let seven = vec![0x11u8; 32];
        let fifteen = vec![0u8; 32];
        let mut pcr_digest = Sha256::new();
        pcr_digest.update(&seven);
        pcr_digest.update(&fifteen);
        let mut expected = Sha256::new();
        expected.update([0u8; 32]);
        expected.update([0x00, 0x00, 0x01, 0x7F]);
        expected.update([0, 0, 0, 1, 0x00, 0x0B, 3, 0x80, 0x80, 0x00]);
        expected.update(pcr_digest.finalize());
        let expected: [u8; 32] = expected.finalize().into();
        let got = policy_pcr_digest("sha256", &[(15, fifteen.clone()), (7, seven.clone())])
            .expect("valid");
        assert_eq!(got, expected, "order of the input does not matter");
        assert_eq!(
            policy_pcr_digest("sha256", &[(7, seven.clone()), (15, fifteen.clone())])
                .expect("valid"),
            expected
        );
    }

    #[test]
    fn every_input_changes_the_digest() {
        let base =
            policy_pcr_digest("sha256", &[(7, vec![1; 32]), (15, vec![0; 32])]).expect("valid");
        let value =
            policy_pcr_digest("sha256", &[(7, vec![2; 32]), (15, vec![0; 32])]).expect("valid");
        let lock =
            policy_pcr_digest("sha256", &[(7, vec![1; 32]), (15, vec![9; 32])]).expect("valid");
        let fewer = policy_pcr_digest("sha256", &[(7, vec![1; 32])]).expect("valid");
        let index =
            policy_pcr_digest("sha256", &[(7, vec![1; 32]), (14, vec![0; 32])]).expect("valid");
        let all = [base, value, lock, fewer, index];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(policy_pcr_digest("sha256", &[(7, vec![0; 20])]).is_err());
        assert!(policy_pcr_digest("sha256", &[(7, vec![0; 32]), (7, vec![1; 32])]).is_err());
        assert!(policy_pcr_digest("sha256", &[(24, vec![0; 32])]).is_err());
        assert!(policy_pcr_digest("sha1", &[(7, vec![0; 20])]).is_ok());
    }

    #[test]
    fn extend_is_hash_of_value_then_measurement() {
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update([5u8; 32]);
        assert_eq!(
            extended("sha256", &[0; 32], &[5; 32]).expect("sha256"),
            h.finalize().to_vec()
        );
        assert!(extended("sha1", &[0; 20], &[5; 20]).is_err());
    }
}
