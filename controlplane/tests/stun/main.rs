//! STUN against the real `portico`: Binding over UDP and TCP on both packet drivers, RFC 5780
//! NAT behaviour discovery, third-party STUN clients, and a burst of 10,000 requests. The
//! requests are built and the answers checked with the test kit's own codec.

/// `$test(io)` as two tests, `io_uring::$test` and `epoll::$test`: the drivers are separate
/// code paths around the same protocol core, so a reply sent from the wrong buffer or socket
/// shows up only in one of them.
macro_rules! on_both_drivers {
    ($($test:ident),* $(,)?) => {
        mod io_uring {
            $( #[test] fn $test() { super::$test("io_uring") } )*
        }
        mod epoll {
            $( #[test] fn $test() { super::$test("epoll") } )*
        }
    };
}

mod burst;
mod interop;
mod rfc5780;
mod tcp;
mod udp;
