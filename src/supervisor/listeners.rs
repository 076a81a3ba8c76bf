//! The sockets `handoff run --listen` names: taken from the service manager
//! if it passed them (at whichever address a `HOST:PORT` resolved to), else
//! bound now, at the first of its addresses that can be bound. One line per
//! socket says where it is.

use super::config::{HostPort, Listen};
use crate::socket::FdKind;
use crate::Handoff;

/// Claims every socket of `listen`, in order, for the children.
pub(crate) fn claim_all(handoff: &Handoff, listen: &[(String, Listen)]) -> Result<(), String> {
    for (name, listen) in listen {
        match listen {
            Listen::Tcp(host) => claim_inet(
                name,
                host,
                |addr| handoff.inherits(name, FdKind::TcpListener, addr),
                |addr| handoff.std_tcp_listener(name, addr).map(drop),
            )?,
            Listen::Udp(host) => claim_inet(
                name,
                host,
                |addr| handoff.inherits(name, FdKind::Udp, addr),
                |addr| handoff.std_udp_socket(name, addr).map(drop),
            )?,
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

/// Tries each address `host` resolved to until one is claimed, those with
/// an inherited socket first (systemd's may be at the second address); the
/// error of each that failed if none is.
fn claim_inet(
    name: &str,
    host: &HostPort,
    inherited: impl Fn(std::net::SocketAddr) -> bool,
    mut claim: impl FnMut(std::net::SocketAddr) -> Result<(), crate::Error>,
) -> Result<(), String> {
    let mut errors = Vec::new();
    let mut order = host.resolved.clone();
    order.sort_by_key(|&addr| !inherited(addr));
    for addr in order {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_with_an_inherited_socket_goes_first_else_the_resolvers_order() {
        let host = HostPort {
            written: "localhost:8080".into(),
            resolved: vec![
                "[::1]:8080".parse().unwrap(),
                "127.0.0.1:8080".parse().unwrap(),
            ],
        };
        let v4 = host.resolved[1];
        let mut tried = Vec::new();
        claim_inet(
            "web",
            &host,
            |addr| addr == v4,
            |addr| {
                tried.push(addr);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            tried,
            [v4],
            "systemd's socket at the second address is taken"
        );

        let mut tried = Vec::new();
        let err = claim_inet(
            "web",
            &host,
            |_| false,
            |addr| {
                tried.push(addr);
                Err(crate::Error::NameInUse { name: "web".into() })
            },
        )
        .unwrap_err();
        assert_eq!(tried, host.resolved, "each in the resolver's order");
        assert!(err.contains("resolved to 2 addresses"), "{err}");
    }
}
