//! Which process accepted a TCP connection: the server side of a loopback
//! connection is found in `/proc/net/tcp{,6}` (its inode appears once it is
//! accepted), and its owner among a process group's members by their fd
//! tables. So an HTTP readiness probe sent to a socket that the old and the
//! new child both accept on counts only when the new child answered it.

use std::net::SocketAddr;
use std::path::Path;

/// The inode of the accepted socket whose local end is `server` and whose
/// peer is `client`, or None while it waits in the backlog (inode 0) or is
/// not found.
pub(crate) fn accepted_inode(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    // An IPv4 connection to a dual-stack IPv6 socket is listed in tcp6,
    // with v4-mapped addresses.
    let mapped = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    let mut tables = vec![("/proc/net/tcp6", mapped(server), mapped(client))];
    if server.is_ipv4() {
        tables.insert(0, ("/proc/net/tcp", server, client));
    }
    tables
        .into_iter()
        .find_map(|(table, server, client)| find_inode(table, server, client))
}

fn find_inode(table: &str, server: SocketAddr, client: SocketAddr) -> Option<u64> {
    let text = std::fs::read_to_string(table).ok()?;
    let (local, remote) = (hex_addr(server), hex_addr(client));
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        if l.eq_ignore_ascii_case(&local) && r.eq_ignore_ascii_case(&remote) {
            inode.parse().ok().filter(|&inode| inode != 0)
        } else {
            None
        }
    })
}

/// Whether a process of the group `pgid` holds the socket `inode`.
pub(crate) fn group_holds(pgid: u32, inode: u64) -> bool {
    let target = format!("socket:[{inode}]");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| process_group(pid) == Some(pgid))
        .any(|pid| holds(pid, &target))
}

/// Whether a process of the group `pgid` is alive (not a zombie).
pub(crate) fn group_has_live_member(pgid: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after = stat[stat.rfind(')')? + 1..].to_owned();
            let mut fields = after.split_whitespace();
            let state = fields.next()?.to_owned();
            let group: u32 = fields.nth(1)?.parse().ok()?;
            Some((state, group))
        })
        .any(|(state, group)| group == pgid && state != "Z" && state != "X")
}

/// The process group of `pid`, from `/proc/PID/stat` (after the command,
/// which may contain anything, in parentheses).
pub(crate) fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // state ppid pgrp
    after.split_whitespace().nth(2)?.parse().ok()
}

fn holds(pid: u32, target: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link == Path::new(target)))
}

/// An address as `/proc/net/tcp` writes it: the IP's bytes as native-endian
/// 32-bit words in hex, then the port in hex.
fn hex_addr(addr: SocketAddr) -> String {
    let ip = match addr {
        SocketAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.ip().octets())),
        SocketAddr::V6(v6) => v6
            .ip()
            .octets()
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_an_ipv4_connection_to_a_dual_stack_socket() {
        let Ok(listener) = std::net::TcpListener::bind("[::]:0") else {
            eprintln!("SKIPPED: no IPv6 on this machine");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let Ok(client) = std::net::TcpStream::connect(server) else {
            eprintln!("SKIPPED: [::] is v6-only here (net.ipv6.bindv6only)");
            return;
        };
        let (accepted, _) = listener.accept().unwrap();
        let inode = accepted_inode(server, client.local_addr().unwrap());
        assert!(inode.is_some(), "found in /proc/net/tcp6 as v4-mapped");
        drop(accepted);
    }

    #[test]
    fn finds_the_process_that_accepted_a_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let local = client.local_addr().unwrap();
        assert_eq!(
            accepted_inode(server, local),
            None,
            "in the backlog: no inode yet"
        );
        let (accepted, _) = listener.accept().unwrap();
        let inode = accepted_inode(server, local).expect("the accepted socket's inode");
        let me = std::process::id();
        let group = process_group(me).expect("our process group");
        assert!(group_holds(group, inode));
        assert!(!group_holds(group, inode + 1_000_000_000));
        drop(accepted);
    }
}
