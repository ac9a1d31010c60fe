//! `sd_notify(3)` status lines for the service manager (`systemctl status` shows them).
//!
//! Best effort by design: without `$NOTIFY_SOCKET` (initramfs, a shell) nothing is sent, and a
//! failure to send never stops provisioning.

use std::os::unix::net::{SocketAddr, UnixDatagram};

fn socket_addr(path: &str) -> std::io::Result<SocketAddr> {
    match path.strip_prefix('@') {
        // Abstract namespace socket (systemd uses these for some managers).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(path),
    }
}

/// Sends `STATUS=<text>` when running under a service manager that asked for notifications.
pub fn status(text: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Some(path) = path.to_str() else {
        return;
    };
    let sent = socket_addr(path).and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        let line = format!("STATUS={}", text.replace('\n', " "));
        socket.send_to_addr(line.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::debug!("sd_notify to {path} failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reaches_a_listening_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        std::env::set_var("NOTIFY_SOCKET", &path);
        status("reencrypt: 40%\nnext");
        let mut buf = [0u8; 128];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=reencrypt: 40% next");
    }
}
