//! The sockets `handoff run --listen` names: taken from the service manager
//! if it passed them, else bound now, at the first address each `HOST:PORT`
//! resolved to that can be bound. One line per socket says where it is.

use super::config::{HostPort, Listen};
use crate::Handoff;

/// Claims every socket of `listen`, in order, for the children.
pub(crate) fn claim_all(handoff: &Handoff, listen: &[(String, Listen)]) -> Result<(), String> {
    for (name, listen) in listen {
        match listen {
            Listen::Tcp(host) => claim_inet(name, host, |addr| {
                handoff.std_tcp_listener(name, addr).map(drop)
            })?,
            Listen::Udp(host) => claim_inet(name, host, |addr| {
                handoff.std_udp_socket(name, addr).map(drop)
            })?,
            Listen::Unix(path) => {
                handoff
                    .std_unix_listener(name, path)
                    .map_err(|e| e.to_string())?;
                tracing::info!(listener = %name, path = %path.display(), "listening");
            }
        }
    }
    Ok(())
}

/// Tries each address `host` resolved to until one is claimed; the error of
/// each that failed if none is.
fn claim_inet(
    name: &str,
    host: &HostPort,
    mut claim: impl FnMut(std::net::SocketAddr) -> Result<(), crate::Error>,
) -> Result<(), String> {
    let mut errors = Vec::new();
    for &addr in &host.resolved {
        match claim(addr) {
            Ok(()) => {
                if host.resolved.len() > 1 || addr.to_string() != host.written {
                    let all: Vec<String> = host.resolved.iter().map(|a| a.to_string()).collect();
                    tracing::info!(listener = %name, asked = %host.written, %addr, resolved = %all.join(","), "listening at the first address that could be bound");
                } else {
                    tracing::info!(listener = %name, %addr, "listening");
                }
                return Ok(());
            }
            Err(error) => errors.push(error.to_string()),
        }
    }
    Err(match errors.as_slice() {
        [one] => one.clone(),
        many => format!(
            "cannot listen as {name:?} at {:?}, which resolved to {} addresses: {}",
            host.written,
            many.len(),
            many.join("; ")
        ),
    })
}
