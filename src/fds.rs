//! The registry of named fds: what this process inherited, what it claimed or
//! created, and what it will hand to a successor.
//!
//! Each fd is inspected at most once (a server may hand over thousands), and
//! lookups by name go through an index.

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::env::name_problem;
use crate::error::Error;
use crate::escape::Escaped;
use crate::inherited::InheritedFd;
use crate::socket::{inspect, same_place, BoundPath, FdInfo, FdKind, LocalAddr};

/// A request for a named fd: which kind, and where it must be bound.
pub(crate) struct Wanted {
    pub kind: FdKind,
    /// `Unnamed` for [`FdKind::Other`].
    pub addr: LocalAddr,
}

/// What a claim hands the caller: its own copy of the fd, and where it is bound.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub fd: OwnedFd,
    pub addr: LocalAddr,
}

/// An inherited fd not claimed yet, with what it is (looked up once).
#[derive(Debug)]
struct Slot {
    inherited: InheritedFd,
    info: OnceCell<Option<FdInfo>>,
}

impl Slot {
    /// What the fd is; `None` if it cannot be inspected.
    fn info(&self) -> Option<&FdInfo> {
        self.info
            .get_or_init(|| inspect(self.inherited.fd.as_fd()).ok())
            .as_ref()
    }

    fn is_unnamed(&self) -> bool {
        matches!(
            self.inherited.name.as_deref(),
            None | Some(UNKNOWN) | Some("")
        )
    }
}

/// An fd registered for handoff under a name.
#[derive(Debug)]
struct Entry {
    name: String,
    /// `None` once closed because this process stops.
    fd: Option<OwnedFd>,
    kind: FdKind,
    addr: LocalAddr,
    /// Set when this process bound a Unix socket path itself.
    bound_path: Option<BoundPath>,
}

/// All named fds of this process.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Inherited fds not claimed yet; `None` once claimed or closed.
    slots: Vec<Option<Slot>>,
    /// Slot indexes by inherited name (systemd may repeat a name).
    by_name: HashMap<String, Vec<usize>>,
    entries: Vec<Entry>,
    /// Each claimed name with the kind and address it was asked for
    /// (`Unnamed` for other fds): a name may be claimed again for another
    /// kind or address (`ListenStream=53` and `ListenDatagram=53` in one
    /// unit share a name).
    claims: HashSet<(String, FdKind, LocalAddr)>,
    /// The inherited names are the service manager's, not a predecessor's.
    names_are_the_managers: bool,
}

/// The name systemd gives fds whose socket unit sets no `FileDescriptorName=`.
const UNKNOWN: &str = "unknown";

impl Registry {
    /// The registry of a process that inherited `inherited`. `from_manager`:
    /// they come from the service manager (socket activation), whose names
    /// are the socket unit's (`FileDescriptorName=`, or the unit's own name
    /// when it sets none), not the application's: a name no inherited fd
    /// carries then falls back to the fd bound at the wanted address. A
    /// predecessor's names are the application's own, and authoritative.
    pub(crate) fn new(inherited: Vec<InheritedFd>, from_manager: bool) -> Self {
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, fd) in inherited.iter().enumerate() {
            if let Some(name) = &fd.name {
                by_name.entry(name.clone()).or_default().push(index);
            }
        }
        Registry {
            slots: inherited
                .into_iter()
                .map(|inherited| {
                    Some(Slot {
                        inherited,
                        info: OnceCell::new(),
                    })
                })
                .collect(),
            by_name,
            entries: Vec::new(),
            claims: HashSet::new(),
            names_are_the_managers: from_manager,
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
    ) -> Result<Claimed, Error> {
        if let Some(reason) = name_problem(name) {
            return Err(Error::InvalidName {
                name: name.to_owned(),
                reason,
            });
        }
        let claim = (name.to_owned(), wanted.kind, wanted.addr.clone());
        if self.claims.contains(&claim) || self.has_claimed(name, wanted) {
            return Err(Error::NameInUse {
                name: name.to_owned(),
            });
        }
        let (fd, addr, bound_path) = match self.find_inherited(name, wanted)? {
            Some(index) => {
                let slot = self.slots[index]
                    .take()
                    .expect("find_inherited returns occupied slots");
                let addr = slot
                    .info()
                    .map_or(LocalAddr::Unnamed, |info| info.addr.clone());
                // A path a predecessor bound stays the service's to unlink.
                let bound_path = match (&addr, slot.inherited.path_id) {
                    (LocalAddr::Unix(path), Some(identity)) => Some(BoundPath {
                        path: path.clone(),
                        identity,
                    }),
                    _ => None,
                };
                (slot.inherited.fd, addr, bound_path)
            }
            None => {
                self.check_address_free(name, wanted)?;
                let (fd, bound_path) = create()?;
                let addr = match wanted.kind {
                    FdKind::Other => LocalAddr::Unnamed,
                    _ => inspect(fd.as_fd()).map_or_else(|_| wanted.addr.clone(), |info| info.addr),
                };
                (fd, addr, bound_path)
            }
        };
        let copy = fd
            .try_clone()
            .map_err(|e| Error::io(format!("cannot duplicate fd {name:?}"), e))?;
        self.claims.insert(claim);
        self.entries.push(Entry {
            name: name.to_owned(),
            fd: Some(fd),
            kind: wanted.kind,
            addr: addr.clone(),
            bound_path,
        });
        Ok(Claimed { fd: copy, addr })
    }

    /// Whether a claim of `name` for `wanted` would get an inherited fd.
    pub(crate) fn inherits(&self, name: &str, wanted: &Wanted) -> bool {
        !self
            .claims
            .contains(&(name.to_owned(), wanted.kind, wanted.addr.clone()))
            && matches!(self.find_inherited(name, wanted), Ok(Some(_)))
    }

    /// Whether `name` was claimed already for what `wanted` asks: any fd
    /// of that name for an fd that is not a socket, else one at that address.
    fn has_claimed(&self, name: &str, wanted: &Wanted) -> bool {
        self.entries.iter().any(|e| {
            e.name == name
                && e.kind == wanted.kind
                && (wanted.kind == FdKind::Other || same_place(&e.addr, &wanted.addr))
        })
    }

    /// Finds the inherited fd for `name`: by name first (several fds may share
    /// a name, then by address among them); else one bound to the wanted
    /// address that is unnamed or, from the service manager, named anything.
    /// Checks its kind and address.
    fn find_inherited(&self, name: &str, wanted: &Wanted) -> Result<Option<usize>, Error> {
        let mut first_error = None;
        for &index in self
            .by_name
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let Some(slot) = &self.slots[index] else {
                continue;
            };
            match check(slot, name, wanted) {
                Ok(()) => return Ok(Some(index)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if wanted.kind == FdKind::Other {
            return first_error.map_or(Ok(None), Err);
        }
        let at_address = self.slots.iter().position(|slot| {
            slot.as_ref().is_some_and(|slot| {
                (slot.is_unnamed() || (self.names_are_the_managers && first_error.is_none()))
                    && slot.info().is_some_and(|info| {
                        info.kind == Some(wanted.kind) && same_place(&info.addr, &wanted.addr)
                    })
            })
        });
        if let Some(error) = first_error {
            return Err(error);
        }
        if let Some(index) = at_address {
            let slot = self.slots[index]
                .as_ref()
                .expect("position found it occupied");
            if !slot.is_unnamed() {
                tracing::info!(
                    listener = name,
                    addr = %wanted.addr,
                    inherited_as = %Escaped(slot.inherited.name.as_deref().unwrap_or_default()),
                    "no socket from the service manager is named this; using the one it passed at this address"
                );
            }
        }
        Ok(at_address)
    }

    /// Refuses to bind an address that an inherited or registered socket
    /// already holds under another name.
    fn check_address_free(&self, name: &str, wanted: &Wanted) -> Result<(), Error> {
        if wanted.kind == FdKind::Other {
            return Ok(());
        }
        let held = |other: &str| Error::AddressHeldByOtherName {
            name: name.to_owned(),
            addr: wanted.addr.to_string(),
            other: other.to_owned(),
        };
        for entry in &self.entries {
            if entry.kind == wanted.kind && same_place(&entry.addr, &wanted.addr) {
                return Err(held(&entry.name));
            }
        }
        for slot in self.slots.iter().flatten() {
            if let Some(info) = slot.info() {
                if info.kind == Some(wanted.kind) && same_place(&info.addr, &wanted.addr) {
                    return Err(held(slot.inherited.name.as_deref().unwrap_or(UNKNOWN)));
                }
            }
        }
        Ok(())
    }

    /// Closes every inherited fd that nobody claimed; returns their names.
    pub(crate) fn close_unclaimed(&mut self) -> Vec<String> {
        self.by_name.clear();
        self.slots
            .drain(..)
            .flatten()
            .map(|slot| slot.inherited.name.unwrap_or_else(|| UNKNOWN.to_owned()))
            .collect()
    }

    /// The fds to pass to a successor, in order, with their names (which
    /// become `LISTEN_FDNAMES`, or the memfd's when too long).
    pub(crate) fn handoff_fds(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        self.entries
            .iter()
            .filter_map(|e| e.fd.as_ref().map(|fd| (e.name.as_str(), fd.as_fd())))
            .collect()
    }

    /// `HANDOFF_SOCKET_PATHS` for a successor: the identity of each passed
    /// fd's socket path, if the service bound one; `None` if no fd has one.
    /// About 32 bytes per path, so thousands of them do not fit in the
    /// environment: `spawn` then sends it in a memfd (see `vars_memfd.rs`).
    pub(crate) fn socket_paths(&self) -> Option<String> {
        let passed = self.entries.iter().filter(|e| e.fd.is_some());
        if !passed.clone().any(|e| e.bound_path.is_some()) {
            return None;
        }
        let fields: Vec<String> = passed
            .map(|e| {
                e.bound_path
                    .as_ref()
                    .map(|b| b.identity.to_string())
                    .unwrap_or_default()
            })
            .collect();
        Some(fields.join(":"))
    }

    /// Drops every fd, after a successor took them over. Socket paths stay.
    pub(crate) fn release(&mut self) {
        self.close_unclaimed();
        self.entries.clear();
    }

    /// Closes every fd because this process stops without a successor, so a
    /// listener really closes once the application drops its own copy (new
    /// clients are refused instead of waiting in a backlog nobody accepts).
    /// The paths this process bound are kept, to unlink at the end.
    pub(crate) fn close_all(&mut self) {
        self.close_unclaimed();
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

    /// The names of the fds this process holds for handoff.
    pub(crate) fn names(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.fd.is_some())
            .map(|e| e.name.clone())
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.fd.is_some()).count()
    }
}

/// Checks that an inherited fd is what `wanted` asks for.
fn check(slot: &Slot, name: &str, wanted: &Wanted) -> Result<(), Error> {
    if wanted.kind == FdKind::Other {
        return Ok(());
    }
    let raw = slot.inherited.fd.as_raw_fd();
    let info = match slot.info() {
        Some(info) => info,
        None => {
            let error = inspect(slot.inherited.fd.as_fd())
                .err()
                .unwrap_or_else(|| std::io::Error::other("unknown"));
            return Err(Error::io(
                format!("cannot inspect inherited fd {raw} ({name:?})"),
                error,
            ));
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::{bind_tcp, bind_udp, bind_unix};
    use std::net::SocketAddr;

    fn inherited(fd: OwnedFd, name: &str) -> InheritedFd {
        InheritedFd {
            fd,
            name: Some(name.to_owned()),
            path_id: None,
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
        let socket = bind_tcp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = local(&socket);
        let mut registry = Registry::new(vec![inherited(socket, "http")], false);

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
        let claimed = registry
            .claim("http", &tcp("127.0.0.1:0".parse().unwrap()), never)
            .unwrap();
        assert_eq!(local(&claimed.fd), addr);
        assert_eq!(claimed.addr, LocalAddr::Inet(addr));
        assert_eq!(registry.handoff_fds().len(), 1);
        // Asking twice for one name is refused.
        let err = registry.claim("http", &tcp(addr), never).unwrap_err();
        assert!(matches!(err, Error::NameInUse { .. }), "{err}");
    }

    #[test]
    fn unclaimed_fds_are_closed_at_ready_and_unnamed_ones_match_by_address() {
        let kept = bind_udp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = local(&kept);
        let unclaimed = bind_tcp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let mut registry = Registry::new(
            vec![
                InheritedFd {
                    fd: kept,
                    name: None,
                    path_id: None,
                },
                inherited(unclaimed, "old"),
            ],
            false,
        );
        let want = Wanted {
            kind: FdKind::Udp,
            addr: LocalAddr::Inet(addr),
        };
        let claimed = registry.claim("dns", &want, never).unwrap();
        assert_eq!(local(&claimed.fd), addr);
        assert_eq!(registry.close_unclaimed(), vec!["old".to_owned()]);
        assert_eq!(registry.handoff_fds()[0].0, "dns");
    }

    #[test]
    fn the_service_managers_names_fall_back_to_the_address() {
        let bind = || bind_tcp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let (a, b) = (bind(), bind());
        let (addr_a, addr_b) = (local(&a), local(&b));
        // A socket unit with two ListenStream= and no FileDescriptorName=:
        // both fds are named after the unit.
        let mut manager = Registry::new(
            vec![inherited(a, "app.socket"), inherited(b, "app.socket")],
            true,
        );
        let claimed = manager.claim("http1", &tcp(addr_b), never).unwrap();
        assert_eq!(local(&claimed.fd), addr_b);
        let claimed = manager.claim("http0", &tcp(addr_a), never).unwrap();
        assert_eq!(local(&claimed.fd), addr_a);
        let names: Vec<&str> = manager.handoff_fds().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["http1", "http0"],
            "handed on under the names asked for"
        );

        // A predecessor's names are the application's: no fallback.
        let c = bind();
        let addr_c = local(&c);
        let mut successor = Registry::new(vec![inherited(c, "admin")], false);
        let err = successor.claim("http0", &tcp(addr_c), never).unwrap_err();
        assert!(
            matches!(err, Error::AddressHeldByOtherName { ref other, .. } if other == "admin"),
            "{err}"
        );
        // Nor when the name is carried, at another address: that is a mistake.
        let (d, e) = (bind(), bind());
        let addr_e = local(&e);
        let mut named = Registry::new(vec![inherited(d, "web"), inherited(e, "other")], true);
        let err = named.claim("web", &tcp(addr_e), never).unwrap_err();
        assert!(matches!(err, Error::AddressMismatch { .. }), "{err}");
    }

    #[test]
    fn fds_sharing_a_name_are_claimed_by_address() {
        let bind = || bind_tcp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let (a, b) = (bind(), bind());
        let (addr_a, addr_b) = (local(&a), local(&b));
        let mut registry = Registry::new(vec![inherited(a, "web"), inherited(b, "web")], false);
        let claimed = registry.claim("web", &tcp(addr_b), never).unwrap();
        assert_eq!(local(&claimed.fd), addr_b);
        let claimed = registry.claim("web", &tcp(addr_a), never).unwrap();
        assert_eq!(local(&claimed.fd), addr_a);
        // The same name and address twice is still a mistake.
        let err = registry.claim("web", &tcp(addr_a), never).unwrap_err();
        assert!(matches!(err, Error::NameInUse { .. }), "{err}");
        // Both go on to the successor under the shared name, in order.
        let names: Vec<&str> = registry.handoff_fds().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["web", "web"]);
        // One name, one address, two kinds (ListenStream=53 and
        // ListenDatagram=53 in one unit): both are claimable.
        // A port free for both (another test may hold the TCP one).
        let (udp, udp_addr, tcp_there) = (0..50)
            .find_map(|_| {
                let udp = bind_udp("127.0.0.1:0".parse().unwrap(), false).unwrap();
                let addr = local(&udp);
                bind_tcp(addr, false).ok().map(|tcp| (udp, addr, tcp))
            })
            .expect("a port free for TCP and UDP");
        let mut dns = Registry::new(
            vec![inherited(udp, "dns"), inherited(tcp_there, "dns")],
            true,
        );
        let udp_wanted = Wanted {
            kind: FdKind::Udp,
            addr: LocalAddr::Inet(udp_addr),
        };
        dns.claim("dns", &udp_wanted, never).unwrap();
        dns.claim("dns", &tcp(udp_addr), never).unwrap();
        // Any other fd: one per name.
        let mut other = Registry::default();
        let any = Wanted {
            kind: FdKind::Other,
            addr: LocalAddr::Unnamed,
        };
        other.claim("log", &any, || Ok((bind(), None))).unwrap();
        let err = other.claim("log", &any, || Ok((bind(), None))).unwrap_err();
        assert!(matches!(err, Error::NameInUse { .. }), "{err}");
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
        let tmp = crate::testutil::TempDir::new("fds");
        let dir = tmp.path();
        let path = dir.join("s.sock");
        let (fd, bound) = bind_unix(&path, nix::sys::socket::SockType::Stream, None).unwrap();
        // A stale socket file (nobody listening) is replaced on the next bind.
        drop(fd);
        let (_fd, rebound) = bind_unix(&path, nix::sys::socket::SockType::Stream, None).unwrap();
        // The first binding's record no longer matches the file: left alone.
        bound.unlink_if_ours();
        assert!(path.exists());
        rebound.unlink_if_ours();
        assert!(!path.exists());
    }
}
