//! `portico-dataplane`: the packet engine.
//!
//! Protocol logic is sans-IO ([`stun`], [`server`], [`turn`], [`media`]): codecs and state machines take
//! bytes, time and a random seed in and return actions out, count into plain
//! [`server::Stats`], and name relay sockets by handle. The drivers in [`io`] are thin shells
//! that move datagrams between sockets and that core, one worker thread per core, and carry
//! its counts, allocations and events to shared memory; [`runtime`] starts them and looks up
//! what the core needs from the system (default routes, random secrets).

pub mod fdlimit;
pub mod io;
pub mod media;
pub mod runtime;
pub mod server;
pub mod stun;
pub mod turn;

#[doc(hidden)]
pub mod fuzzing;
