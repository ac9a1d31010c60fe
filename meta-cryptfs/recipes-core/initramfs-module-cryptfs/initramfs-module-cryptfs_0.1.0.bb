SUMMARY = "initramfs-framework module for cryptfs: provision and unlock the encrypted root"
DESCRIPTION = "Installs the cryptfs module of OE's initramfs-framework as /init.d/85-cryptfs \
               (after udev, before rootfs): it provisions the root volume (in-place encryption \
               or CI-image takeover, KEK enrollment, passphrase wipe, re-encryption set-up), \
               unlocks it with the KEK token and hands the mapping to the rootfs module."
HOMEPAGE = "https://github.com/cryptfs/cryptfs"
BUGTRACKER = "https://github.com/cryptfs/cryptfs/issues"
SECTION = "base"
LICENSE = "MIT | Apache-2.0"
# nooelint: oelint.var.licenseremotefile - a single script from the repository, as oe-core's own initramfs modules
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302 \
                    file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"
CVE_PRODUCT = "cryptfs"

# The module is the repository's units/initramfs-framework/cryptfs, the very file the VM tier
# boots.
# nooelint: oelint.vars.fileextrapaths, oelint.vars.outofcontext - the layer lives in the repository whose units/ it installs
FILESEXTRAPATHS:prepend := "${THISDIR}/../../../units/initramfs-framework:"
SRC_URI = "file://cryptfs"

UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}"

inherit allarch

do_install() {
    install -d ${D}/init.d
    install -m 0755 ${UNPACKDIR}/cryptfs ${D}/init.d/85-cryptfs
}

FILES:${PN} += "/init.d/85-cryptfs"

# The framework itself, the cryptfs binary and its configuration, e2fsck/resize2fs for the
# in-place encryption, findfs for the boot partition by label (mount, umount, grep and sleep
# come with the framework's busybox).
RDEPENDS:${PN} = "cryptfs e2fsprogs-e2fsck e2fsprogs-resize2fs initramfs-framework-base util-linux-findfs"
RRECOMMENDS:${PN} = "kernel-module-dm-crypt kernel-module-efivarfs"

# An initramfs script for the target only.
BBCLASSEXTEND = ""
