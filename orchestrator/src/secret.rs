//! Secrets in memory: zeroized on drop, never printed.

use base64::Engine;
use zeroize::Zeroizing;

/// Raw KEK secret bytes (the data sealed by the TPM).
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps bytes that are secret; the caller's copy should be zeroized by the caller.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Zeroizing::new(bytes))
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The LUKS2 keyslot passphrase systemd derives from a token secret: standard base64 with
    /// padding, no newline.
    pub fn keyslot_passphrase(&self) -> Passphrase {
        Passphrase(Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .encode(self.expose())
                .into_bytes(),
        ))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// A keyslot passphrase (the image passphrase, or one derived from a KEK secret).
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// Wraps passphrase bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Passphrase(Zeroizing::new(bytes))
    }

    /// The passphrase bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_bytes() {
        let s = Secret::new(vec![0x41; 32]);
        assert!(!format!("{s:?}").contains("AAAA"));
        assert!(!format!("{:?}", s.keyslot_passphrase()).contains("QUFB"));
        assert_eq!(s.keyslot_passphrase().expose().len(), 44);
    }
}
