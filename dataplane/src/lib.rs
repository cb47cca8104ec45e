//! `portico-dataplane`: the packet engine.
//!
//! Protocol logic is sans-IO ([`stun`], [`server`]): codecs and state machines take bytes and
//! time in and return actions out. The drivers in [`io`] are thin shells that move datagrams
//! between sockets and that core, one worker thread per core; [`runtime`] starts them.

pub mod io;
pub mod runtime;
pub mod server;
pub mod stun;
pub mod turn;

#[doc(hidden)]
pub mod fuzzing;
