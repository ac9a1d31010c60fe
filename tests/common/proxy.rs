//! A logging TCP proxy between a TPM client and swtpm (tests/tpm_bus.rs, tests/tpm_lockout.rs).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::Swtpm;

/// TPM2_CC_Unseal, TPM2_CC_Create, TPM2_CC_Load: the commands that carry the secret or prepare it.
pub const CC_UNSEAL: u32 = 0x15E;
pub const CC_CREATE: u32 = 0x153;
pub const CC_LOAD: u32 = 0x157;
/// TPM2_CC_Shutdown.
pub const CC_SHUTDOWN: u32 = 0x145;

/// Bytes recorded by the proxy, shared with its threads.
type Log = Arc<Mutex<Vec<u8>>>;

/// A logging TCP proxy in front of a swtpm: `port` forwards to the TPM's command port, `port+1`
/// to its control port. Every byte of the command port, both directions, lands in `bus`; the
/// client-to-TPM bytes also in `commands` (to list the command codes sent).
pub struct Proxy {
    pub port: u16,
    bus: Log,
    commands: Log,
}

fn pump(mut from: TcpStream, mut to: TcpStream, logs: Vec<Log>, cut: Option<(u32, u32)>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // The TCTI writes a command whole: its code is at bytes 6..10 of the chunk.
                if let Some((cc, pid)) = cut {
                    if n >= 10 && buf[6..10] == cc.to_be_bytes() {
                        // SAFETY: kill(2) on the swtpm this test started.
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                        break;
                    }
                }
                for log in &logs {
                    log.lock().expect("log").extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn serve(listener: TcpListener, target: u16, logs: Option<(Log, Log)>, cut: Option<(u32, u32)>) {
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (up, down) = match &logs {
                Some((bus, commands)) => (vec![bus.clone(), commands.clone()], vec![bus.clone()]),
                None => (Vec::new(), Vec::new()),
            };
            let (c2, s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || pump(client, server, up, cut));
            std::thread::spawn(move || pump(s2, c2, down, None));
        }
    });
}

/// Listeners on a free pair of adjacent loopback ports (the data port and its control port).
/// A pair found free can be taken before it is bound (a swtpm or a client of another test
/// thread, seen in a CI run as "Address already in use"): another pair is tried then.
fn bind_port_pair() -> (u16, TcpListener, TcpListener) {
    for _ in 0..50 {
        let port = super::free_port_pair();
        if let (Ok(data), Ok(ctrl)) = (
            TcpListener::bind(("127.0.0.1", port)),
            TcpListener::bind(("127.0.0.1", port + 1)),
        ) {
            return (port, data, ctrl);
        }
    }
    panic!("no free pair of loopback ports for the TPM proxy after 50 tries");
}

impl Proxy {
    pub fn start(tpm: &Swtpm) -> Proxy {
        Self::start_cutting(tpm, None)
    }

    /// A proxy that SIGKILLs the swtpm (a power cut) instead of forwarding a command with the
    /// code `cut_at` (e.g. mid-unlock, when TPM2_Unseal is sent).
    pub fn start_cutting(tpm: &Swtpm, cut_at: Option<u32>) -> Proxy {
        let (port, data, ctrl) = bind_port_pair();
        let bus = Arc::new(Mutex::new(Vec::new()));
        let commands = Arc::new(Mutex::new(Vec::new()));
        let cut = cut_at.map(|cc| (cc, tpm.pid()));
        serve(data, tpm.port, Some((bus.clone(), commands.clone())), cut);
        serve(ctrl, tpm.port + 1, None, None);
        Proxy {
            port,
            bus,
            commands,
        }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Whether a command with code `cc` was sent since the last [`Proxy::take`].
    pub fn saw(&self, cc: u32) -> bool {
        command_codes(&self.commands.lock().expect("log")).contains(&cc)
    }

    /// The bytes seen since the last call, and the command codes sent in them.
    pub fn take(&self) -> (Vec<u8>, Vec<u32>) {
        // The client has exited; let the pump threads drain what is in flight.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let bus = std::mem::take(&mut *self.bus.lock().expect("log"));
        let commands = std::mem::take(&mut *self.commands.lock().expect("log"));
        (bus, command_codes(&commands))
    }
}

/// The command codes of a raw TPM command stream (tag u16, size u32, code u32, ...).
fn command_codes(mut stream: &[u8]) -> Vec<u32> {
    let mut codes = Vec::new();
    while stream.len() >= 10 {
        let size = u32::from_be_bytes(stream[2..6].try_into().expect("4")) as usize;
        codes.push(u32::from_be_bytes(stream[6..10].try_into().expect("4")));
        if size < 10 || size > stream.len() {
            break;
        }
        stream = &stream[size..];
    }
    codes
}
