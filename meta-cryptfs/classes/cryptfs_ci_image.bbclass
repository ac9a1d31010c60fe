# cryptfs_ci_image: makes the CI image, as the reference's OSTREE_OTA_EXT4_LUKS = "1" does.
#
# With CRYPTFS_CI_IMAGE = "1" the root filesystem's ext4 image also comes as <image>.ext4.luks:
# encrypted in place by the native `cryptfs image encrypt` (shrunk by 32 MiB, 16 MiB data offset,
# the well-known passphrase in keyslot 31 with a cheap PBKDF2, label otaroot, and cryptfs's
# key-origin marker), which every device re-encrypts with its own key on first boot. Point the
# root partition of the WKS at it (--source rawcopy --sourceparams="file=<image>.ext4.luks").
# No TPM, no journal, no loop device: it works on the image file.
#
# Crash-safe: the command works on a copy and only a finished image is renamed to its final
# name; a cut leaves <image>.ext4.luks.tmp, which the next run of the task replaces.

CRYPTFS_CI_IMAGE ??= "0"
# Public by design: every device flashed from the image shares it until its first boot.
CRYPTFS_CI_PASSPHRASE ??= "fiopassphrase"
CRYPTFS_CI_KEYSLOT ??= "31"
CRYPTFS_CI_LABEL ??= "otaroot"

CONVERSIONTYPES:append = " luks"
CONVERSION_DEPENDS_luks = "cryptfs-native"
# nooelint: oelint.vars.specific - "luks" is the conversion type this class defines
CONVERSION_CMD:luks = "cryptfs_ci_encrypt ${IMAGE_NAME}.${type}"
IMAGE_FSTYPES:append = " ${@'ext4.luks' if d.getVar('CRYPTFS_CI_IMAGE') == '1' else ''}"

cryptfs_ci_encrypt[doc] = "Encrypts a copy of the ext4 image $1 into $1.luks with cryptfs image encrypt"
cryptfs_ci_encrypt() {
    src="$1"
    out="$1.luks"
    pass="${WORKDIR}/cryptfs-ci-passphrase"
    rm -f "$out" "$out.tmp"
    rm -rf "$out.tmp.cryptfs-encrypt"
    cp --sparse=always "$src" "$out.tmp"
    (umask 077 && printf '%s' '${CRYPTFS_CI_PASSPHRASE}' > "$pass")
    cryptfs image encrypt --image "$out.tmp" --passphrase-file "$pass" \
        --keyslot ${CRYPTFS_CI_KEYSLOT} --label ${CRYPTFS_CI_LABEL}
    rm -f "$pass"
    mv "$out.tmp" "$out"
}
