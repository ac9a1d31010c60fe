//! LUKS2: reading the on-disk metadata ourselves, and changing it through libcryptsetup.

pub mod device;
pub mod finalize;
pub mod marker;
pub mod metadata;
pub mod reencrypt;

/// Data offset of in-place encryption: half the 32 MiB reduction, as the reference's
/// `cryptsetup reencrypt --encrypt --reduce-device-size 32M` places it.
pub const DATA_OFFSET_BYTES: u64 = 16 * 1024 * 1024;
/// How much in-place encryption takes from the end of the filesystem.
pub const REDUCE_DEVICE_BYTES: u64 = 32 * 1024 * 1024;
/// The reference's sector size of the encrypted data, and cryptfs's default (`sector_size` in
/// the configuration chooses 4096; see the crash-windows note on why it is always explicit).
pub const SECTOR_SIZE: u32 = 512;
/// aes-xts-plain64 with two 256-bit keys.
pub const VOLUME_KEY_BYTES: usize = 64;
/// Cipher and mode of every volume cryptfs formats.
pub const CIPHER: (&str, &str) = ("aes", "xts-plain64");
