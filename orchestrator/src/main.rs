//! The `cryptfs` binary: logging, signals, and the error chain on exit.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use cryptfs::cli::{Cli, Command};
use cryptfs::config::Config;

/// Logging goes to stderr only: stdout carries nothing but each command's own result (the
/// initramfs reads the root device's path from `unlock --device-path`).
fn init_logging(cryptsetup_debug: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("CRYPTFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=warn"));
    if cryptsetup_debug {
        if let Ok(directive) = "libcryptsetup=debug".parse() {
            filter = filter.add_directive(directive);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let cryptsetup_debug = std::env::var_os("CRYPTFS_CRYPTSETUP_DEBUG").is_some();
    init_logging(cryptsetup_debug);
    // Before libcryptsetup's first line: its default sink is stdout.
    cryptfs::luks::device::route_library_log();
    if cryptsetup_debug {
        libcryptsetup_rs::set_debug_level(libcryptsetup_rs::consts::vals::CryptDebugLevel::All);
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(stopped) = err.downcast_ref::<cryptfs::StoppedOnRequest>() {
                eprintln!("cryptfs: {stopped}");
                return ExitCode::from(cryptfs::StoppedOnRequest::EXIT_CODE);
            }
            eprintln!("cryptfs: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, stage } => {
            let config = Config::load(&config)?;
            let stop = Arc::new(AtomicBool::new(false));
            // SIGTERM/SIGINT end a long step between hotzones: killing it mid-hotzone would
            // leave a suspended dm mapping that freezes the mounted root.
            let stop_on_signal = stop.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                if let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    tracing::warn!("stop requested; finishing the current hotzone");
                    stop_on_signal.store(true, Ordering::SeqCst);
                }
            });
            let state = tokio::task::spawn_blocking(move || {
                cryptfs::runner::run(&config, stage.into(), stop)
            })
            .await??;
            println!("cryptfs: state {state}");
            Ok(())
        }
        Command::RecoverOnline { config } => {
            let config = Config::load(&config)?;
            match cryptfs::online_recovery::run(&config)? {
                cryptfs::online_recovery::Outcome::NothingSuspended => {
                    tracing::debug!("recover-online: no device of the stack is suspended");
                }
                cryptfs::online_recovery::Outcome::Recovered(how) => {
                    tracing::info!("recover-online: {how}; the stack is resumed");
                }
            }
            Ok(())
        }
        Command::Status { config, json } => {
            let config = Config::load(&config)?;
            let report = cryptfs::status::collect(&config)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", cryptfs::status::render(&report));
            }
            Ok(())
        }
        Command::Unlock {
            config,
            test,
            device_path,
            recovery_key_file: Some(key_file),
        } => {
            let config = Config::load(&config)?;
            let key = cryptfs::recovery::read_recovery_key(&key_file)?;
            let keyslot = cryptfs::unlock::with_recovery_key(&config, &key, !test)?;
            let what = if test {
                "test only, nothing activated"
            } else {
                "activated"
            };
            if device_path {
                println!(
                    "/dev/mapper/{}",
                    config.mapping_name.as_deref().unwrap_or_default()
                );
            } else {
                println!(
                    "cryptfs: the recovery key opened keyslot {keyslot} of {} ({what})",
                    config.device.display()
                );
            }
            Ok(())
        }
        Command::Unlock {
            config,
            test: false,
            device_path,
            recovery_key_file: None,
        } => {
            let config = Config::load(&config)?;
            let path = format!(
                "/dev/mapper/{}",
                config.mapping_name.as_deref().unwrap_or_default()
            );
            let outcome = cryptfs::unlock::activate(&config)?;
            if device_path {
                println!("{path}");
                return Ok(());
            }
            match outcome {
                cryptfs::unlock::Activation::AlreadyActive => {
                    println!("cryptfs: {path} is already active");
                }
                cryptfs::unlock::Activation::Activated { keyslot } => println!(
                    "cryptfs: keyslot {keyslot} of {} opened by its token; active as {path}",
                    config.device.display()
                ),
            }
            Ok(())
        }
        Command::Unlock { config, .. } => {
            let config = Config::load(&config)?;
            // A test of the token itself: the keyring's hand-off does not count.
            let unlocked = cryptfs::unlock::with_token(&config, false)?;
            let kind = unlocked
                .meta
                .tokens
                .get(&unlocked.token)
                .map_or("?", |t| t.kind.as_str());
            println!(
                "cryptfs: token {} ({kind}) opened keyslot {} of {} (test only, nothing activated)",
                unlocked.token,
                unlocked.keyslot,
                config.device.display()
            );
            Ok(())
        }
        Command::Reseal {
            config,
            recovery_key_file,
            prepare,
            pcr7,
            finish,
        } => {
            let config = Config::load(&config)?;
            let request = match (prepare, pcr7, finish) {
                (_, _, true) => cryptfs::reseal::Request::Finish,
                (true, Some(hex_value), false) => cryptfs::reseal::Request::Prepare {
                    pcr7: hex::decode(hex_value.trim())
                        .map_err(|e| anyhow::anyhow!("--pcr7 is not a hex PCR value: {e}"))?,
                },
                _ => cryptfs::reseal::Request::Replace,
            };
            let key = recovery_key_file
                .as_deref()
                .map(cryptfs::recovery::read_recovery_key)
                .transpose()?;
            let outcome = tokio::task::spawn_blocking(move || {
                cryptfs::reseal::run(&config, &request, key.as_ref())
            })
            .await??;
            print!("{}", cryptfs::reseal::render(&outcome));
            Ok(())
        }
        Command::Image {
            command:
                cryptfs::cli::ImageCommand::Encrypt {
                    image,
                    partition,
                    passphrase_file,
                    keyslot,
                    label,
                    sector_size,
                },
        } => {
            let bytes = cryptfs::secret::read_secret_file(&passphrase_file, "CI passphrase")?;
            let request = cryptfs::image::Request {
                image: image.clone(),
                partition,
                passphrase: cryptfs::secret::Passphrase::new(bytes.to_vec()),
                keyslot,
                label,
                sector_size,
            };
            let outcome =
                tokio::task::spawn_blocking(move || cryptfs::image::encrypt(&request)).await??;
            let what = match outcome {
                cryptfs::image::Outcome::Encrypted => "encrypted",
                cryptfs::image::Outcome::Resumed => "encrypted (an interrupted run finished)",
                cryptfs::image::Outcome::AlreadyDone => "already a CI image, nothing written",
            };
            println!("cryptfs: {}: {what}", image.display());
            Ok(())
        }
        Command::SystemdGenerator {
            config, normal_dir, ..
        } => {
            // A generator must never hold up boot: a configuration it cannot use is reported
            // (the journal shows generator output) and the unit keeps its static default.
            match cryptfs::generator::run(&config, &normal_dir) {
                Ok(_) => {}
                Err(e) => eprintln!(
                    "cryptfs-generator: no drop-in written, cryptfs.service keeps \
                     RequiresMountsFor=/boot: {e:#}"
                ),
            }
            Ok(())
        }
        #[cfg(feature = "test-hooks")]
        Command::ExportPlaintext { config, out } => {
            let config = Config::load(&config)?;
            let unlocked = cryptfs::unlock::with_token(&config, true)?;
            let bytes = cryptfs::plaintext::export(
                &config.device,
                &unlocked.meta,
                &unlocked.volume_key,
                &out,
            )?;
            println!(
                "cryptfs: token {} opened keyslot {}; {} MiB of plaintext written to {}",
                unlocked.token,
                unlocked.keyslot,
                bytes >> 20,
                out.display()
            );
            Ok(())
        }
    }
}
