//! The registry of named fds: what this process inherited, what it claimed or
//! created, and what it will hand to a successor.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::env::{name_problem, InheritedFd};
use crate::error::Error;
use crate::socket::{inspect, same_place, BoundPath, FdKind, LocalAddr};

/// A request for a named fd: which kind, and where it must be bound.
pub(crate) struct Wanted {
    pub kind: FdKind,
    /// `Unnamed` for [`FdKind::Other`].
    pub addr: LocalAddr,
}

/// An fd registered for handoff under a name.
#[derive(Debug)]
struct Entry {
    name: String,
    /// `None` once closed because this process stops.
    fd: Option<OwnedFd>,
    /// Set when this process bound a Unix socket path itself.
    bound_path: Option<BoundPath>,
}

/// All named fds of this process.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Inherited fds not claimed yet; `None` once claimed.
    inherited: Vec<Option<InheritedFd>>,
    entries: Vec<Entry>,
}

/// The name systemd gives fds whose socket unit sets no `FileDescriptorName=`.
const UNKNOWN: &str = "unknown";

impl Registry {
    pub(crate) fn new(inherited: Vec<InheritedFd>) -> Self {
        Registry {
            inherited: inherited.into_iter().map(Some).collect(),
            entries: Vec::new(),
        }
    }

    /// Returns the inherited fd named `name` if there is one (checked against
    /// `wanted`), or else the fd `create` makes; either way the fd is kept for
    /// the successor, and the caller gets its own duplicate.
    pub(crate) fn claim(
        &mut self,
        name: &str,
        wanted: &Wanted,
        create: impl FnOnce() -> Result<(OwnedFd, Option<BoundPath>), Error>,
    ) -> Result<OwnedFd, Error> {
        if let Some(reason) = name_problem(name) {
            return Err(Error::InvalidName {
                name: name.to_owned(),
                reason,
            });
        }
        if self.entries.iter().any(|e| e.name == name) {
            return Err(Error::NameInUse {
                name: name.to_owned(),
            });
        }
        let (fd, bound_path) = match self.find_inherited(name, wanted)? {
            Some(index) => {
                let inherited = self.inherited[index].take();
                (
                    inherited.expect("find_inherited returns occupied slots").fd,
                    None,
                )
            }
            None => {
                self.check_address_free(name, wanted)?;
                create()?
            }
        };
        let copy = fd
            .try_clone()
            .map_err(|e| Error::io(format!("cannot duplicate fd {name:?}"), e))?;
        self.entries.push(Entry {
            name: name.to_owned(),
            fd: Some(fd),
            bound_path,
        });
        tracing::debug!(listener = name, kind = ?wanted.kind, "fd registered for handoff");
        Ok(copy)
    }

    /// Finds the inherited fd for `name`: by name first (several fds may share
    /// a name under systemd, then by address among them), else an unnamed one
    /// bound to the wanted address. Checks its kind and address.
    fn find_inherited(&self, name: &str, wanted: &Wanted) -> Result<Option<usize>, Error> {
        let named: Vec<usize> = self
            .inherited
            .iter()
            .enumerate()
            .filter(|(_, slot)| {
                slot.as_ref()
                    .is_some_and(|i| i.name.as_deref() == Some(name))
            })
            .map(|(index, _)| index)
            .collect();
        let mut first_error = None;
        for &index in &named {
            match self.check(index, name, wanted) {
                Ok(()) => return Ok(Some(index)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        if wanted.kind == FdKind::Other {
            return Ok(None);
        }
        let unnamed = self.inherited.iter().position(|slot| {
            slot.as_ref().is_some_and(|i| {
                matches!(i.name.as_deref(), None | Some(UNKNOWN) | Some(""))
                    && inspect(i.fd.as_fd()).is_ok_and(|info| {
                        info.kind == Some(wanted.kind) && info.addr == wanted.addr
                    })
            })
        });
        Ok(unnamed)
    }

    fn check(&self, index: usize, name: &str, wanted: &Wanted) -> Result<(), Error> {
        let Some(inherited) = &self.inherited[index] else {
            return Ok(());
        };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&inherited.fd);
        if wanted.kind == FdKind::Other {
            return Ok(());
        }
        let info = inspect(inherited.fd.as_fd())
            .map_err(|e| Error::io(format!("cannot inspect inherited fd {raw} ({name:?})"), e))?;
        if info.kind != Some(wanted.kind) {
            return Err(Error::WrongKind {
                name: name.to_owned(),
                fd: raw,
                expected: wanted.kind.describe(),
                found: info.to_string(),
            });
        }
        if !info.addr.satisfies(&wanted.addr) {
            return Err(Error::AddressMismatch {
                name: name.to_owned(),
                inherited: info.addr.to_string(),
                requested: wanted.addr.to_string(),
            });
        }
        Ok(())
    }

    /// Refuses to bind an address that an inherited or registered socket
    /// already holds under another name.
    fn check_address_free(&self, name: &str, wanted: &Wanted) -> Result<(), Error> {
        if wanted.kind == FdKind::Other {
            return Ok(());
        }
        let inherited = self.inherited.iter().flatten().map(|i| {
            (
                i.name.clone().unwrap_or_else(|| UNKNOWN.to_owned()),
                i.fd.as_fd(),
            )
        });
        let registered = self
            .entries
            .iter()
            .filter_map(|e| e.fd.as_ref().map(|fd| (e.name.clone(), fd.as_fd())));
        for (other, fd) in inherited.chain(registered) {
            if let Ok(info) = inspect(fd) {
                if info.kind == Some(wanted.kind) && same_place(&info.addr, &wanted.addr) {
                    return Err(Error::AddressHeldByOtherName {
                        name: name.to_owned(),
                        addr: wanted.addr.to_string(),
                        other,
                    });
                }
            }
        }
        Ok(())
    }

    /// Closes every inherited fd that nobody claimed; returns their names.
    pub(crate) fn close_unclaimed(&mut self) -> Vec<String> {
        self.inherited
            .drain(..)
            .flatten()
            .map(|i| i.name.unwrap_or_else(|| UNKNOWN.to_owned()))
            .collect()
    }

    /// The fds to pass to a successor, in order, with their names.
    pub(crate) fn handoff_fds(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        self.entries
            .iter()
            .filter_map(|e| e.fd.as_ref().map(|fd| (e.name.as_str(), fd.as_fd())))
            .collect()
    }

    /// Drops every fd, after a successor took them over. Socket paths stay.
    pub(crate) fn release(&mut self) {
        self.inherited.clear();
        self.entries.clear();
    }

    /// Closes every fd because this process stops without a successor, so a
    /// listener really closes once the application drops its own copy (new
    /// clients are refused instead of waiting in a backlog nobody accepts).
    /// The paths this process bound are kept, to unlink at the end.
    pub(crate) fn close_all(&mut self) {
        self.inherited.clear();
        for entry in &mut self.entries {
            entry.fd = None;
        }
    }

    /// Unlinks the Unix socket paths this process bound, if still ours. For a
    /// process that stops without a successor.
    pub(crate) fn unlink_paths(&mut self) {
        for entry in self.entries.drain(..) {
            if let Some(bound) = entry.bound_path {
                bound.unlink_if_ours();
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.fd.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::{bind_tcp, bind_udp, bind_unix};
    use std::net::SocketAddr;

    fn inherited(fd: OwnedFd, name: &str) -> InheritedFd {
        InheritedFd {
            fd,
            name: Some(name.to_owned()),
        }
    }

    fn tcp(addr: SocketAddr) -> Wanted {
        Wanted {
            kind: FdKind::TcpListener,
            addr: LocalAddr::Inet(addr),
        }
    }

    fn local(fd: &OwnedFd) -> SocketAddr {
        match inspect(fd.as_fd()).unwrap().addr {
            LocalAddr::Inet(addr) => addr,
            other => panic!("not inet: {other:?}"),
        }
    }

    fn never() -> Result<(OwnedFd, Option<BoundPath>), Error> {
        panic!("must not bind a new socket")
    }

    #[test]
    fn an_inherited_socket_is_returned_by_name_and_checked() {
        let socket = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = local(&socket);
        let mut registry = Registry::new(vec![inherited(socket, "http")]);

        // Same name, another address: an error, not a second socket.
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = registry.claim("http", &tcp(other), never).unwrap_err();
        assert!(matches!(err, Error::AddressMismatch { .. }), "{err}");
        // Same name, another kind.
        let udp = Wanted {
            kind: FdKind::Udp,
            addr: LocalAddr::Inet(addr),
        };
        let err = registry.claim("http", &udp, never).unwrap_err();
        assert!(err.to_string().contains("is not a UDP socket"), "{err}");
        // Same address under another name.
        let err = registry.claim("admin", &tcp(addr), never).unwrap_err();
        assert!(
            matches!(err, Error::AddressHeldByOtherName { ref other, .. } if other == "http"),
            "{err}"
        );
        // The right request gets the inherited socket; port 0 means any port.
        let fd = registry
            .claim("http", &tcp("127.0.0.1:0".parse().unwrap()), never)
            .unwrap();
        assert_eq!(local(&fd), addr);
        assert_eq!(registry.handoff_fds().len(), 1);
        // Asking twice for one name is refused.
        let err = registry.claim("http", &tcp(addr), never).unwrap_err();
        assert!(matches!(err, Error::NameInUse { .. }), "{err}");
    }

    #[test]
    fn unclaimed_fds_are_closed_at_ready_and_unnamed_ones_match_by_address() {
        let kept = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = local(&kept);
        let unclaimed = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut registry = Registry::new(vec![
            InheritedFd {
                fd: kept,
                name: None,
            },
            inherited(unclaimed, "old"),
        ]);
        let want = Wanted {
            kind: FdKind::Udp,
            addr: LocalAddr::Inet(addr),
        };
        let fd = registry.claim("dns", &want, never).unwrap();
        assert_eq!(local(&fd), addr);
        assert_eq!(registry.close_unclaimed(), vec!["old".to_owned()]);
        assert_eq!(registry.handoff_fds()[0].0, "dns");
    }

    #[test]
    fn bad_names_are_refused() {
        let mut registry = Registry::default();
        for name in ["", "a:b", "tab\there"] {
            let err = registry
                .claim(name, &tcp("127.0.0.1:0".parse().unwrap()), never)
                .unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{name:?}: {err}");
        }
    }

    #[test]
    fn a_unix_path_is_unlinked_only_while_it_is_ours() {
        let dir = std::env::temp_dir().join(format!("handoff-fds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let (fd, bound) = bind_unix(&path, nix::sys::socket::SockType::Stream).unwrap();
        // A stale socket file (nobody listening) is replaced on the next bind.
        drop(fd);
        let (_fd, rebound) = bind_unix(&path, nix::sys::socket::SockType::Stream).unwrap();
        // The first binding's record no longer matches the file: left alone.
        bound.unlink_if_ours();
        assert!(path.exists());
        rebound.unlink_if_ours();
        assert!(!path.exists());
        std::fs::remove_dir(&dir).unwrap();
    }
}
