//! The dataplane's file-descriptor budget: what the configured limits need, and raising
//! `RLIMIT_NOFILE` to it at start.
//!
//! Every relay is a bound UDP socket, so `turn.max_allocations` is a descriptor count. The
//! process starts with whatever limit it inherited (often 1,024 soft; 20,000 here), which
//! would cap the box far below its configured quota: Allocates would then fail with 508
//! once `socket()` returns `EMFILE`, long before `turn.max_allocations`.
//!
//! The policy: the descriptors every allocation needs (one relay socket each, the TCP
//! connection limit, listeners and a margin) are *required*: when the limit cannot be raised
//! that far the dataplane refuses to start and says which key asks for how many, because a
//! box that accepts the configuration and then answers 508 at a fraction of it fails in
//! production, under load, where nobody reads the start log. What only some allocations use
//! (the second relay of a dual IPv4+IPv6 allocation, the held socket of an EVEN-PORT
//! reservation) is *wanted*: if it cannot be had the dataplane starts with a warning, and
//! those extras are refused one by one the way they already are when the box is full
//! (ADDRESS-ERROR-CODE 508, 508 for the reservation).

use std::io;

/// Descriptors the dataplane holds besides relays and TCP connections: per worker an
/// io_uring or epoll instance and its listen sockets, the signalfd, the shared-memory
/// mapping's descriptor, log files, the `/proc` reads of the runtime.
const FIXED_PER_WORKER: u64 = 8;
/// Margin for what nobody counted (library internals, a reload's short overlap).
const SLACK: u64 = 256;

/// What the configuration needs, part by part; [`FdBudget::required`] and
/// [`FdBudget::wanted`] add them up. A new kind of descriptor (media relay ports, say)
/// is one more field, counted in one of the two sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdBudget {
    /// `turn.max_allocations`: one relay socket each.
    pub allocations: u64,
    /// Second relay sockets of dual-family allocations (and EVEN-PORT reservations): up to
    /// one per allocation when both families have a relay address.
    pub second_relays: u64,
    /// TURN over TCP/TLS connections the TCP thread accepts at most.
    pub tcp_connections: u64,
    /// Listen sockets (one UDP socket per worker per address, one TCP listener each).
    pub listeners: u64,
    /// Media relay sockets (four per session: RTP and RTCP of two legs, up to
    /// `media.max_sessions`, at most the ports of `media.ports`) and static NAT map sockets
    /// (each public port, plus up to `max_bindings` binding sockets per map).
    pub media: u64,
    /// Rings, event fds, signalfd, shared memory, logs, margin.
    pub fixed: u64,
}

impl FdBudget {
    /// The budget for `max_allocations` allocations (`dual`: both families have a relay
    /// address, so an allocation may hold two relay sockets), `tcp_connections` TCP
    /// clients, `listen` addresses (plus `listen_tls` ones) served by `workers` workers.
    pub fn new(
        max_allocations: usize,
        dual: bool,
        tcp_connections: usize,
        listen: usize,
        listen_tls: usize,
        workers: usize,
    ) -> FdBudget {
        let (workers, listen) = (workers as u64, listen as u64);
        FdBudget {
            allocations: max_allocations as u64,
            second_relays: if dual { max_allocations as u64 } else { 0 },
            tcp_connections: tcp_connections as u64,
            listeners: workers * listen + listen + listen_tls as u64,
            media: 0,
            fixed: workers * FIXED_PER_WORKER + SLACK,
        }
    }

    /// With `turn.relay_mode = "shared"` an IPv4 UDP relay holds no descriptor: only the
    /// relays of TCP/TLS clients (at most one per connection) are bound sockets, plus two
    /// sockets per worker (steered and raw) and the program's four. IPv6 relays stay
    /// sockets; with an IPv6 relay address they are wanted, one per allocation, not required.
    pub fn steered(mut self, workers: usize, v6_relays: bool) -> FdBudget {
        let max = self.allocations;
        self.allocations = max.min(self.tcp_connections);
        self.second_relays = if v6_relays { max } else { 0 };
        self.fixed += 2 * workers as u64 + 4;
        self
    }

    /// Adds the media relay's and the NAT maps' sockets: `media_sockets` of them.
    pub fn with_media(mut self, media_sockets: usize) -> FdBudget {
        self.media = media_sockets as u64;
        self
    }

    /// Below this the configured quota cannot be served: the start is refused.
    pub fn required(&self) -> u64 {
        self.allocations + self.tcp_connections + self.listeners + self.media + self.fixed
    }

    /// With this every allocation may also be dual (or reserve a port).
    pub fn wanted(&self) -> u64 {
        self.required() + self.second_relays
    }
}

/// What [`raise`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raised {
    /// Soft and hard limit before.
    pub before: (u64, u64),
    /// Soft and hard limit now.
    pub after: (u64, u64),
    /// The soft limit covers [`FdBudget::wanted`], not only [`FdBudget::required`].
    pub all_wanted: bool,
}

/// The limits a process with the given `current` (soft, hard) limits should ask for, given
/// that a privileged process (`CAP_SYS_RESOURCE`) may raise its hard limit up to `nr_open`:
/// the wanted budget if possible, else as much as can be had; never lower than now.
pub fn plan(budget: &FdBudget, current: (u64, u64), nr_open: u64, privileged: bool) -> (u64, u64) {
    let (soft, hard) = current;
    let ceiling = if privileged { hard.max(nr_open) } else { hard };
    let target = budget.wanted().min(ceiling).max(soft);
    let new_hard = if target > hard { target } else { hard };
    (target, new_hard)
}

fn getrlimit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

fn setrlimit(soft: u64, hard: u64) -> io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `/proc/sys/fs/nr_open`: the most a hard limit may be raised to (1,048,576 by default).
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Raises `RLIMIT_NOFILE` towards the budget: the soft limit up to the hard one, and the
/// hard one too when the process may (root, or `CAP_SYS_RESOURCE`; tried, not guessed).
/// Errors when not even [`FdBudget::required`] can be had, with the numbers and the key.
pub fn raise(budget: &FdBudget, max_allocations: usize) -> Result<Raised, String> {
    let before = getrlimit().map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))?;
    let nr_open = nr_open();
    // Try with the hard limit raised first; without the capability that fails with EPERM
    // and the soft limit alone is raised, up to the hard one.
    let mut after = before;
    let (soft, hard) = plan(budget, before, nr_open, true);
    if (soft, hard) != before {
        if setrlimit(soft, hard).is_ok() {
            after = (soft, hard);
        } else {
            let (soft, hard) = plan(budget, before, nr_open, false);
            if (soft, hard) != before && setrlimit(soft, hard).is_ok() {
                after = (soft, hard);
            }
        }
    }
    if after.0 < budget.required() {
        return Err(format!(
            "turn.max_allocations = {max_allocations} needs {} file descriptors (relays {}, TCP connections {}, listeners {}, other {}), \
             but RLIMIT_NOFILE can only be raised to {} (hard limit {}, fs.nr_open {nr_open}): \
             lower turn.max_allocations, or start Portico as root / with CAP_SYS_RESOURCE or a higher LimitNOFILE",
            budget.required(),
            budget.allocations,
            budget.tcp_connections,
            budget.listeners,
            budget.fixed,
            after.0,
            after.1,
        ));
    }
    Ok(Raised {
        before,
        after,
        all_wanted: after.0 >= budget.wanted(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(allocs: usize, dual: bool) -> FdBudget {
        FdBudget::new(allocs, dual, 4096, 2, 0, 2)
    }

    #[test]
    fn the_budget_counts_a_relay_per_allocation_and_a_second_for_dual() {
        let b = budget(100_000, false);
        assert_eq!(b.allocations, 100_000);
        assert_eq!(b.second_relays, 0);
        // 2 workers × 2 addresses UDP + 2 TCP listeners; 2 × 8 + 256 fixed.
        assert_eq!(b.listeners, 6);
        assert_eq!(b.fixed, 272);
        assert_eq!(b.required(), 100_000 + 4096 + 6 + 272);
        assert_eq!(b.wanted(), b.required());
        let d = budget(100_000, true);
        assert_eq!(d.wanted(), d.required() + 100_000);
    }

    #[test]
    fn steered_relays_need_descriptors_only_for_tcp_clients_and_ipv6() {
        let b = budget(100_000, false).steered(2, false);
        assert_eq!(b.allocations, 4096, "TCP clients' relays only");
        assert_eq!(b.required(), 4096 + 4096 + 6 + 272 + 8);
        assert!(
            b.required() < 20_000,
            "100,000 allocations fit a 20,000 limit"
        );
        assert_eq!(b.wanted(), b.required());
        let v6 = budget(100_000, true).steered(2, true);
        assert_eq!(v6.wanted(), v6.required() + 100_000);
    }

    #[test]
    fn the_plan_raises_soft_then_hard_and_never_lowers() {
        let b = budget(100_000, false);
        let need = b.wanted();
        // Unprivileged: soft up to the hard limit, no further.
        assert_eq!(plan(&b, (1024, 20_000), 1 << 20, false), (20_000, 20_000));
        // Privileged: hard raised to the need.
        assert_eq!(plan(&b, (1024, 20_000), 1 << 20, true), (need, need));
        // ... but not past fs.nr_open.
        assert_eq!(plan(&b, (1024, 20_000), 50_000, true), (50_000, 50_000));
        // Already enough: nothing lowered.
        assert_eq!(
            plan(&b, (1 << 20, 1 << 20), 1 << 20, false),
            (1 << 20, 1 << 20)
        );
        // The hard limit is high enough: only the soft one moves.
        assert_eq!(plan(&b, (1024, 1 << 20), 1 << 20, false), (need, 1 << 20));
    }

    /// Really calls setrlimit: the soft limit ends at or above the need (this process may
    /// raise it to its hard limit at least), and a need beyond anything possible is refused
    /// naming the key and the numbers.
    #[test]
    fn raise_sets_the_process_limit_or_refuses_naming_the_key() {
        let (_, hard) = getrlimit().unwrap();
        let small = budget(100, false);
        let r = raise(&small, 100).unwrap();
        assert!(r.after.0 >= small.required(), "{r:?}");
        assert_eq!(getrlimit().unwrap(), r.after);
        // More than fs.nr_open and any hard limit allows.
        let huge = budget(usize::MAX / 4, false);
        let e = raise(&huge, usize::MAX / 4).unwrap_err();
        assert!(e.contains("turn.max_allocations"), "{e}");
        assert!(e.contains(&huge.required().to_string()), "{e}");
        // Refusal leaves a usable limit, never below what was there.
        assert!(getrlimit().unwrap().1 >= hard.min(r.after.1));
    }
}
