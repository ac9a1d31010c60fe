//! Just enough DER for the PKCS#11 protector: a self-signed X.509 v3 certificate (`CN=LmP`,
//! sha256WithRSAEncryption) built around a signature the token makes, and reading the RSA public
//! key back out of a certificate.

use anyhow::{bail, Context};

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const NULL: u8 = 0x05;
const UTF8_STRING: u8 = 0x0c;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// sha256WithRSAEncryption, 1.2.840.113549.1.1.11
const OID_SHA256_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
];
/// rsaEncryption, 1.2.840.113549.1.1.1
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
/// commonName, 2.5.4.3
const OID_CN: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];

/// A DER TLV.
pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, &parts.concat())
}

/// An unsigned big-endian integer as DER INTEGER.
pub fn uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend(trimmed);
    tlv(INTEGER, &content)
}

fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut content = vec![0u8];
    content.extend_from_slice(bytes);
    tlv(BIT_STRING, &content)
}

/// `CN=<cn>` as a DER Name.
pub fn name(cn: &str) -> Vec<u8> {
    let atv = seq(&[OID_CN, &tlv(UTF8_STRING, cn.as_bytes())]);
    seq(&[&tlv(SET, &atv)])
}

fn algorithm_sha256_rsa() -> Vec<u8> {
    seq(&[OID_SHA256_RSA, &tlv(NULL, &[])])
}

/// (year, month, day, hour, minute, second) of a Unix time, UTC.
fn civil(unix: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y as u64,
        m as u64,
        d as u64,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
    )
}

fn time(unix: u64) -> Vec<u8> {
    let (y, mo, d, h, mi, s) = civil(unix);
    if (1950..2050).contains(&y) {
        let text = format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y % 100);
        tlv(UTC_TIME, text.as_bytes())
    } else {
        let text = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z");
        tlv(GENERALIZED_TIME, text.as_bytes())
    }
}

/// The RSA SubjectPublicKeyInfo for modulus `n` and exponent `e`.
pub fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    let key = seq(&[&uint(n), &uint(e)]);
    seq(&[&seq(&[OID_RSA, &tlv(NULL, &[])]), &bit_string(&key)])
}

/// The to-be-signed part of a self-signed v3 certificate for `cn`.
pub fn tbs_certificate(
    serial: &[u8],
    cn: &str,
    not_before_unix: u64,
    years: u64,
    spki: &[u8],
) -> Vec<u8> {
    let version = tlv(0xa0, &tlv(INTEGER, &[2]));
    let subject = name(cn);
    let not_after = not_before_unix + years * 365 * 86_400 + (years / 4) * 86_400;
    let validity = seq(&[&time(not_before_unix), &time(not_after)]);
    seq(&[
        &version,
        &uint(serial),
        &algorithm_sha256_rsa(),
        &subject,
        &validity,
        &subject,
        spki,
    ])
}

/// A certificate from its TBS part and the token's PKCS#1 v1.5 SHA-256 signature over it.
pub fn certificate(tbs: &[u8], signature: &[u8]) -> Vec<u8> {
    seq(&[tbs, &algorithm_sha256_rsa(), &bit_string(signature)])
}

/// Reads one TLV at the start of `input`: (tag, content, rest).
fn read(input: &[u8]) -> crate::Result<(u8, &[u8], &[u8])> {
    if input.len() < 2 {
        bail!("truncated DER");
    }
    let tag = input[0];
    let (len, header) = if input[1] < 0x80 {
        (usize::from(input[1]), 2)
    } else {
        let n = usize::from(input[1] & 0x7f);
        if n == 0 || n > 4 || input.len() < 2 + n {
            bail!("unsupported DER length");
        }
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let end = header
        .checked_add(len)
        .filter(|e| *e <= input.len())
        .context("truncated DER")?;
    Ok((tag, &input[header..end], &input[end..]))
}

/// The RSA public key (modulus, exponent) of a DER certificate, leading zeros stripped.
pub fn rsa_public_key_of_certificate(cert: &[u8]) -> crate::Result<(Vec<u8>, Vec<u8>)> {
    let (_, cert, _) = read(cert)?;
    let (_, tbs, _) = read(cert)?;
    let mut rest = tbs;
    let (tag, _, after) = read(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serial, signature, issuer, validity, subject
    for _ in 0..5 {
        rest = read(rest)?.2;
    }
    let (_, spki, _) = read(rest)?;
    let (_, algorithm, after) = read(spki)?;
    if !algorithm.starts_with(OID_RSA) {
        bail!("the certificate's key is not RSA");
    }
    let (_, bits, _) = read(after)?;
    let key = bits.get(1..).context("empty key")?;
    let (_, key, _) = read(key)?;
    let (_, n, after) = read(key)?;
    let (_, e, _) = read(after)?;
    let strip = |v: &[u8]| {
        v.iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect::<Vec<u8>>()
    };
    Ok((strip(n), strip(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(1_795_647_723), (2026, 11, 25, 23, 2, 3));
    }

    #[test]
    fn public_key_round_trips_through_a_certificate() {
        let n: Vec<u8> = (0..256).map(|i| (i as u8) | 0x80).collect();
        let e = vec![1, 0, 1];
        let tbs = tbs_certificate(&[0x42; 16], "LmP", 1_795_647_723, 20, &rsa_spki(&n, &e));
        let cert = certificate(&tbs, &[7u8; 256]);
        let (n2, e2) = rsa_public_key_of_certificate(&cert).expect("parse");
        assert_eq!(n2, n);
        assert_eq!(e2, e);
    }

    #[test]
    fn integers_are_positive_and_minimal() {
        assert_eq!(uint(&[0, 0, 0x7f]), vec![2, 1, 0x7f]);
        assert_eq!(uint(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(tlv(4, &[0; 200])[..3], [4, 0x81, 200]);
    }
}
