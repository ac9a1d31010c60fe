//! No secret on the TPM bus: a TCP proxy between the TPM client and swtpm records every byte of
//! enrollment and of unlock, and the KEK secret (raw, and as the base64 keyslot passphrase) is
//! searched for in it. systemd 252's plugin is measured through the same proxy (the anchor), and
//! a test-only switch turning salting and parameter encryption off shows the search finds the
//! secret when it is there. Also: a TPM whose storage primary differs from enrollment's is
//! refused before any secret-bearing command.

mod common;

use base64::Engine;
use common::proxy::{Proxy, CC_CREATE, CC_LOAD, CC_UNSEAL};
use common::{Image, Rig, Swtpm};
use cryptfs::kek::tpm2::{Tpm2Protector, PRIMARY_NAME_FIELD};
use cryptfs::kek::{KekProtector, SealedKek};

fn kek_token(rig: &Rig) -> (u32, serde_json::Value) {
    common::luks2(&rig.device)
        .tokens
        .iter()
        .find(|(_, t)| t.kind == "systemd-tpm2")
        .map(|(id, t)| (*id, t.json.clone()))
        .expect("a systemd-tpm2 token")
}

/// The sealed secret, unsealed by the library straight from swtpm (not through the proxy).
fn secret_of(rig: &Rig) -> Vec<u8> {
    let mut config = rig.config().kek.tpm2;
    config.tcti = rig.tpm.tcti();
    let sealed = SealedKek::from_token(&kek_token(rig).1).expect("token");
    Tpm2Protector::new(&config)
        .expect("protector")
        .unseal(&sealed)
        .expect("unseal directly")
        .expose()
        .to_vec()
}

struct Row {
    client: &'static str,
    phase: &'static str,
    bytes: usize,
    raw: bool,
    b64: bool,
}

fn measure(client: &'static str, phase: &'static str, bus: &[u8], secret: &[u8]) -> Row {
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    Row {
        client,
        phase,
        bytes: bus.len(),
        raw: memchr::memmem::find(bus, secret).is_some(),
        b64: memchr::memmem::find(bus, b64.as_bytes()).is_some(),
    }
}

#[test]
fn neither_the_secret_nor_its_base64_crosses_the_tpm_bus() {
    let rig = Rig::new(Image::Plain, 128);
    let proxy = Proxy::start(&rig.tpm);
    rig.point_tpm_at(&proxy.tcti());

    let enroll = rig.run_stage("all");
    let (enroll_bus, enroll_cc) = proxy.take();
    assert!(
        enroll_cc.contains(&CC_CREATE),
        "enrollment sealed through the proxy"
    );
    let unlock = rig.cryptfs(&["unlock", "--test"]);
    assert!(
        unlock.status.success(),
        "{}",
        String::from_utf8_lossy(&unlock.stderr)
    );
    let (unlock_bus, unlock_cc) = proxy.take();
    assert!(
        unlock_cc.contains(&CC_UNSEAL),
        "unlock unsealed through the proxy"
    );
    let secret = secret_of(&rig);
    assert_eq!(secret.len(), 32);
    let (_, token) = kek_token(&rig);
    assert!(
        token[PRIMARY_NAME_FIELD]
            .as_str()
            .is_some_and(|n| n.len() == 68),
        "the primary is pinned: {token}"
    );
    common::assert_nothing_written_contains(&rig, &[&secret], &[enroll, unlock]);

    // The anchor: systemd 252's plugin through the same proxy, on the token cryptfs enrolled.
    let slot =
        common::systemd_tpm2_plugin_unlocks(&rig.device, &format!("swtpm:port={}", proxy.port))
            .expect("systemd 252's plugin unlocks what cryptfs enrolls (pin field and all)");
    let (systemd_bus, systemd_cc) = proxy.take();
    assert!(systemd_cc.contains(&CC_UNSEAL));
    assert_eq!(
        slot,
        kek_token(&rig).1["keyslots"][0]
            .as_str()
            .expect("slot")
            .parse::<u32>()
            .expect("n")
    );

    // The proof can fail: the same unlock with salting and parameter encryption switched off.
    let clear = rig.cryptfs_env(
        &["unlock", "--test"],
        &[("CRYPTFS_TEST_TPM_CLEARTEXT_SESSIONS", "1")],
    );
    assert!(
        clear.status.success(),
        "{}",
        String::from_utf8_lossy(&clear.stderr)
    );
    let (clear_bus, _) = proxy.take();

    let rows = [
        measure("cryptfs", "enroll", &enroll_bus, &secret),
        measure("cryptfs", "unlock", &unlock_bus, &secret),
        measure("systemd 252 plugin", "unlock", &systemd_bus, &secret),
        measure(
            "cryptfs, sessions unsalted (test switch)",
            "unlock",
            &clear_bus,
            &secret,
        ),
    ];
    let mut table = String::from(
        "| client | phase | bytes on the bus | raw secret seen | base64 seen |\n|---|---|---|---|---|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.client,
            r.phase,
            r.bytes,
            if r.raw { "yes" } else { "no" },
            if r.b64 { "yes" } else { "no" }
        ));
    }
    println!("{table}");
    common::write_result(
        "tpm_bus.md",
        &format!(
            "# The KEK secret on the TPM bus (tests/tpm_bus.rs)\n\nEvery byte between the TPM \
             client and swtpm (command port, both directions), searched for the 32-byte secret \
             and its base64 form (the keyslot passphrase).\n\n{table}"
        ),
    );
    for r in &rows {
        assert!(r.bytes > 0, "{} {}: nothing captured", r.client, r.phase);
        assert!(
            !r.b64,
            "{} {}: base64 of the secret on the bus",
            r.client, r.phase
        );
    }
    for r in &rows[..2] {
        assert!(!r.raw, "{} {}: the secret on the bus", r.client, r.phase);
    }
    assert!(
        rows[3].raw,
        "unsalted sessions must show the secret: the search is real"
    );
}

#[test]
fn a_tpm_with_another_storage_primary_is_refused_before_any_secret_bearing_command() {
    let mut rig = Rig::new(Image::Plain, 128);
    rig.run_stage("all");
    let (id, token) = kek_token(&rig);

    // A tampered pin on the right TPM: refused, and neither Load nor Unseal was sent.
    let proxy = Proxy::start(&rig.tpm);
    rig.point_tpm_at(&proxy.tcti());
    let mut tampered = token.clone();
    let name = token[PRIMARY_NAME_FIELD].as_str().expect("pin").to_string();
    let flipped = format!(
        "{}{}",
        &name[..name.len() - 1],
        if name.ends_with('0') { "1" } else { "0" }
    );
    tampered[PRIMARY_NAME_FIELD] = serde_json::Value::from(flipped);
    cryptfs::luks::device::replace_token(&rig.device, id, &tampered).expect("tamper");
    let out = rig.cryptfs(&["unlock", "--test"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("storage primary key differs"), "{stderr}");
    let (_, codes) = proxy.take();
    assert!(!codes.is_empty());
    for cc in [CC_LOAD, CC_UNSEAL] {
        assert!(
            !codes.contains(&cc),
            "command {cc:#x} sent before the pin check: {codes:x?}"
        );
    }

    // A token without the pin (systemd-cryptenroll's, older cryptfs'): trusted on first use.
    let mut unpinned = token.clone();
    unpinned
        .as_object_mut()
        .expect("object")
        .remove(PRIMARY_NAME_FIELD);
    cryptfs::luks::device::replace_token(&rig.device, id, &unpinned).expect("unpin");
    let out = rig.cryptfs(&["unlock", "--test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cryptfs::luks::device::replace_token(&rig.device, id, &token).expect("restore");

    // Another TPM altogether (a fresh state: other seeds, so another primary).
    let fresh = rig.dir.path().join("other-tpm");
    std::fs::create_dir_all(&fresh).expect("dir");
    rig.tpm = Swtpm::start_on(&fresh);
    let proxy = Proxy::start(&rig.tpm);
    rig.point_tpm_at(&proxy.tcti());
    let out = rig.cryptfs(&["unlock", "--test"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("storage primary key differs from the one the KEK was sealed under"),
        "{stderr}"
    );
    let (_, codes) = proxy.take();
    assert!(
        !codes.contains(&CC_LOAD) && !codes.contains(&CC_UNSEAL),
        "{codes:x?}"
    );
}
