SUMMARY = "Boot-time root filesystem encryption with a TPM 2.0 or PKCS#11 protected key"
DESCRIPTION = "cryptfs takes a device's root filesystem from shipped (plain ext4, or the CI \
               LUKS2 image) to encrypted with a per-device volume key whose KEK only this \
               device's TPM 2.0 or PKCS#11 token releases, unattended and power-cut safe. The \
               native build provides 'cryptfs image encrypt' for the CI image."
HOMEPAGE = "https://github.com/cryptfs/cryptfs"
BUGTRACKER = "https://github.com/cryptfs/cryptfs/issues"
SECTION = "base"
LICENSE = "MIT | Apache-2.0"
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=10;endline=10;md5=86b31c7756a1a7962f28b62856ed4f05"
CVE_PRODUCT = "cryptfs"

# libcryptsetup-rs-sys and tss-esapi-sys run bindgen, which needs libclang (meta-clang).
DEPENDS += "clang-native cryptsetup tpm2-tss"

# The units come from the repository's units/ (the very files the VM tier boots), the default
# configurations from this recipe's files/.
# nooelint: oelint.vars.fileextrapaths, oelint.vars.outofcontext - the layer lives in the repository whose units/ it installs
FILESEXTRAPATHS:prepend := "${THISDIR}/../../../units:"

PV = "0.1.0+git"

SRC_URI = "git://github.com/cryptfs/cryptfs.git;protocol=https;branch=main \
           file://cryptfs.service \
           file://cryptfs-generator \
           file://cryptfs-tpm2.toml \
           file://cryptfs-pkcs11.toml \
           "
# The layer ships inside the repository it builds, so no commit can name itself here: pin the
# one you build in local.conf (SRCREV:pn-cryptfs = "<commit>").
# nooelint: oelint.vars.autorev - see above
SRCREV ?= "${AUTOREV}"

# scarthgap unpacks into WORKDIR, later series into UNPACKDIR.
UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}/git"

inherit cargo systemd pkgconfig

require cryptfs-crates.inc

# The binary crate; a shipped build has no test features.
CARGO_SRC_DIR = "orchestrator"

export LIBCLANG_PATH = "${STAGING_LIBDIR_NATIVE}"
export BINDGEN_EXTRA_CLANG_ARGS = "--sysroot=${STAGING_DIR_HOST}"

# Where the root volume is and how the KEK is kept, drawn from MACHINE_FEATURES: tpm2, or
# optee (PKCS#11 through OP-TEE's libckteec, the reference's arm setup). Override in
# local.conf; the file is a CONFFILE.
CRYPTFS_KEK ??= "${@bb.utils.contains('MACHINE_FEATURES', 'tpm2', 'tpm2', bb.utils.contains('MACHINE_FEATURES', 'optee', 'pkcs11', 'tpm2', d), d)}"
CRYPTFS_ROOT_DEVICE ??= "/dev/disk/by-label/otaroot"
CRYPTFS_BOOT_DIR ??= "/boot"
CRYPTFS_LABEL ??= "otaroot"
CRYPTFS_MAPPING_NAME ??= "rootfs"

do_install:append:class-target() {
    install -d ${D}${systemd_system_unitdir} ${D}${systemd_unitdir}/system-generators
    install -m 0644 ${UNPACKDIR}/cryptfs.service ${D}${systemd_system_unitdir}/cryptfs.service
    install -m 0755 ${UNPACKDIR}/cryptfs-generator ${D}${systemd_unitdir}/system-generators/cryptfs-generator
    install -d ${D}${sysconfdir}/cryptfs
    sed -e 's#@CRYPTFS_ROOT_DEVICE@#${CRYPTFS_ROOT_DEVICE}#' \
        -e 's#@CRYPTFS_BOOT_DIR@#${CRYPTFS_BOOT_DIR}#' \
        -e 's#@CRYPTFS_LABEL@#${CRYPTFS_LABEL}#' \
        -e 's#@CRYPTFS_MAPPING_NAME@#${CRYPTFS_MAPPING_NAME}#' \
        ${UNPACKDIR}/cryptfs-${CRYPTFS_KEK}.toml > ${D}${sysconfdir}/cryptfs/cryptfs.toml
    chmod 0644 ${D}${sysconfdir}/cryptfs/cryptfs.toml
}

SYSTEMD_SERVICE:${PN} = "cryptfs.service"
FILES:${PN} += "${systemd_unitdir}/system-generators/cryptfs-generator"
CONFFILES:${PN} = "${sysconfdir}/cryptfs/cryptfs.toml"

# cryptfs runs e2fsck and resize2fs (the in-place encryption's shrink, the final grow); the
# KEK needs the TPM's device TCTI or OP-TEE's PKCS#11 client library.
RDEPENDS:${PN}:class-target = "${CRYPTFS_KEK_RDEPENDS} e2fsprogs-e2fsck e2fsprogs-resize2fs"
CRYPTFS_KEK_RDEPENDS = "${@'libtss2-tcti-device' if d.getVar('CRYPTFS_KEK') == 'tpm2' else 'optee-client'}"

BBCLASSEXTEND = "native"
