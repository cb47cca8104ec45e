//! Names of the dataplane's per-worker counters.
//!
//! A counter is one `u64` slot in each worker's counter block in shared memory. The dataplane
//! only ever adds to its own worker's slots; the control plane reads all of them and exposes
//! them as Prometheus metrics. Both sides index the slots through [`Counter`], so adding a
//! counter is one line here (and a layout version bump in [`crate::shm`] when the slot count
//! changes).

macro_rules! counters {
    ($( $variant:ident => $metric:literal [$($lk:literal = $lv:literal),*] $help:literal; )*) => {
        /// One counter slot per variant, in declaration order.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter { $($variant),* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),*];

            /// Metric family name, without the `portico_` prefix and `_total` suffix.
            pub fn metric(self) -> &'static str {
                match self { $(Counter::$variant => $metric),* }
            }

            /// Label pairs that tell this slot apart within its family.
            pub fn labels(self) -> &'static [(&'static str, &'static str)] {
                match self { $(Counter::$variant => &[$(($lk, $lv)),*]),* }
            }

            pub fn help(self) -> &'static str {
                match self { $(Counter::$variant => $help),* }
            }

            /// Families whose name ends in `_active` are gauges (they go down as well as up);
            /// all others only ever grow.
            pub fn is_gauge(self) -> bool {
                self.metric().ends_with("_active")
            }
        }
    };
}

counters! {
    RxPackets => "dataplane_rx_packets" [] "Datagrams received on listen sockets.";
    RxBytes => "dataplane_rx_bytes" [] "Bytes received on listen sockets.";
    TxPackets => "dataplane_tx_packets" [] "Datagrams sent from listen sockets.";
    TxBytes => "dataplane_tx_bytes" [] "Bytes sent from listen sockets.";
    SendErrors => "dataplane_send_errors" [] "Sends the kernel refused.";
    TcpAccepted => "dataplane_tcp_connections" ["result" = "accepted"] "TCP connections to STUN/TURN listeners.";
    TcpRejected => "dataplane_tcp_connections" ["result" = "rejected"] "TCP connections to STUN/TURN listeners.";
    StunBindingSuccess => "stun_requests" ["result" = "success"] "STUN Binding requests by result.";
    StunBindingUnknownAttribute => "stun_requests" ["result" = "unknown_attribute"] "STUN Binding requests by result.";
    StunBindingBadRequest => "stun_requests" ["result" = "bad_request"] "STUN Binding requests by result.";
    StunBindingIndication => "stun_indications" [] "STUN Binding indications (keep-alives) received.";
    DropTooShort => "dataplane_drops" ["reason" = "too_short"] "Packets dropped, by reason.";
    DropNotStun => "dataplane_drops" ["reason" = "not_stun"] "Packets dropped, by reason.";
    DropBadLength => "dataplane_drops" ["reason" = "bad_length"] "Packets dropped, by reason.";
    DropBadAttribute => "dataplane_drops" ["reason" = "bad_attribute"] "Packets dropped, by reason.";
    DropBadFingerprint => "dataplane_drops" ["reason" = "bad_fingerprint"] "Packets dropped, by reason.";
    DropUnexpectedClass => "dataplane_drops" ["reason" = "unexpected_class"] "Packets dropped, by reason.";
    DropUnknownMethod => "dataplane_drops" ["reason" = "unknown_method"] "Packets dropped, by reason.";
    DropTruncated => "dataplane_drops" ["reason" = "truncated"] "Packets dropped, by reason.";
    DropNoBuffer => "dataplane_drops" ["reason" = "no_buffer"] "Packets dropped, by reason.";
    DropBadSource => "dataplane_drops" ["reason" = "bad_source"] "Packets dropped, by reason.";
    DropTcpFraming => "dataplane_drops" ["reason" = "tcp_framing"] "Packets dropped, by reason.";
    DropStreamBacklog => "dataplane_drops" ["reason" = "stream_backlog"] "Packets dropped, by reason.";
    TcpClosedHandshakeTimeout => "dataplane_tcp_closed" ["reason" = "handshake_timeout"] "STUN/TURN TCP and TLS connections the server closed, by reason.";
    TcpClosedIdle => "dataplane_tcp_closed" ["reason" = "idle"] "STUN/TURN TCP and TLS connections the server closed, by reason.";
    TcpClosedTlsError => "dataplane_tcp_closed" ["reason" = "tls_error"] "STUN/TURN TCP and TLS connections the server closed, by reason.";
    TcpClosedBacklog => "dataplane_tcp_closed" ["reason" = "backlog"] "STUN/TURN TCP and TLS connections the server closed, by reason.";
    TlsHandshakes => "dataplane_tls_handshakes" [] "TLS handshakes completed on TURN-over-TLS listeners.";
    TurnAllocationsActive => "turn_allocations_active" [] "TURN allocations now active.";
    TurnAllocationsCreated => "turn_allocations_created" [] "TURN allocations created.";
    TurnAllocationsExpired => "turn_allocations_ended" ["reason" = "expired"] "TURN allocations ended, by reason.";
    TurnAllocationsDeleted => "turn_allocations_ended" ["reason" = "deleted"] "TURN allocations ended, by reason.";
    TurnPermissionsActive => "turn_permissions_active" [] "TURN permissions now installed.";
    TurnPermissionsCreated => "turn_permissions_created" [] "TURN permissions installed.";
    TurnChannelsActive => "turn_channels_active" [] "TURN channels now bound.";
    TurnChannelsCreated => "turn_channels_created" [] "TURN channels bound.";
    TurnRequestsOk => "turn_requests" ["result" = "success"] "TURN requests by result.";
    TurnRequestsError => "turn_requests" ["result" = "error"] "TURN requests by result.";
    TurnChallenges => "turn_challenges" [] "401 challenges sent to requests without credentials.";
    TurnAuthBadIntegrity => "turn_auth_failures" ["reason" = "bad_integrity"] "TURN authentication failures, by reason.";
    TurnAuthUnknownUser => "turn_auth_failures" ["reason" = "unknown_user"] "TURN authentication failures, by reason.";
    TurnAuthExpired => "turn_auth_failures" ["reason" = "expired_credentials"] "TURN authentication failures, by reason.";
    TurnAuthStaleNonce => "turn_auth_failures" ["reason" = "stale_nonce"] "TURN authentication failures, by reason.";
    TurnAuthWrongUser => "turn_auth_failures" ["reason" = "wrong_credentials"] "TURN authentication failures, by reason.";
    TurnPeerDeniedSpecial => "turn_peer_denied" ["reason" = "special_purpose"] "Peers refused by the peer policy, by reason.";
    TurnPeerDeniedConfigured => "turn_peer_denied" ["reason" = "configured"] "Peers refused by the peer policy, by reason.";
    TurnQuotaRejected => "turn_quota_rejected" [] "Requests refused by a quota (486, 508, or 300 Try Alternate to another box).";
    RelayClientToPeerPackets => "relay_packets" ["direction" = "client_to_peer"] "Relayed packets, by direction.";
    RelayPeerToClientPackets => "relay_packets" ["direction" = "peer_to_client"] "Relayed packets, by direction.";
    RelayClientToPeerBytes => "relay_bytes" ["direction" = "client_to_peer"] "Relayed payload bytes, by direction.";
    RelayPeerToClientBytes => "relay_bytes" ["direction" = "peer_to_client"] "Relayed payload bytes, by direction.";
    DropNoAllocation => "dataplane_drops" ["reason" = "no_allocation"] "Packets dropped, by reason.";
    DropNoPermission => "dataplane_drops" ["reason" = "no_permission"] "Packets dropped, by reason.";
    DropNoChannel => "dataplane_drops" ["reason" = "no_channel"] "Packets dropped, by reason.";
    DropBandwidth => "dataplane_drops" ["reason" = "bandwidth"] "Packets dropped, by reason.";
    DropRateLimited => "dataplane_drops" ["reason" = "rate_limited"] "Packets dropped, by reason.";
    DropBadChannelData => "dataplane_drops" ["reason" = "bad_channel_data"] "Packets dropped, by reason.";
    DropBlacklisted => "dataplane_drops" ["reason" = "blacklisted"] "Packets dropped, by reason.";
    ConfigApplied => "dataplane_config_applied" [] "Configuration generations the dataplane applied.";
    LoopTurns => "dataplane_loop_turns" [] "Turns of the worker event loops.";
    TcpRelayConnected => "turn_tcp_relay_connections" ["result" = "connected"] "RFC 6062 TCP relay data connections, by outcome.";
    TcpRelayConnectFailed => "turn_tcp_relay_connections" ["result" = "connect_failed"] "RFC 6062 TCP relay data connections, by outcome.";
    TcpRelayAttempt => "turn_tcp_relay_connections" ["result" = "peer_accepted"] "RFC 6062 TCP relay data connections, by outcome.";
    TcpRelayRefused => "turn_tcp_relay_connections" ["result" = "peer_refused"] "RFC 6062 TCP relay data connections, by outcome.";
    TcpRelayBound => "turn_tcp_relay_connections" ["result" = "bound"] "RFC 6062 TCP relay data connections, by outcome.";
    TcpRelayClosedUnbound => "turn_tcp_relay_closed" ["reason" = "unbound_timeout"] "RFC 6062 TCP relay data connections the server closed, by reason.";
    TcpRelayClosedAllocation => "turn_tcp_relay_closed" ["reason" = "allocation_ended"] "RFC 6062 TCP relay data connections the server closed, by reason.";
    TcpRelayClosedEnd => "turn_tcp_relay_closed" ["reason" = "closed"] "RFC 6062 TCP relay data connections the server closed, by reason.";
    TcpRelayClosedIdle => "turn_tcp_relay_closed" ["reason" = "idle"] "RFC 6062 TCP relay data connections the server closed, by reason.";
    TcpRelayPaused => "turn_tcp_relay_backpressure" [] "Times an RFC 6062 data connection stopped reading one side because the other side's buffer was full.";
    MediaSessionsActive => "media_sessions_active" [] "Media relay sessions now active.";
    MediaSessionsCreated => "media_sessions_created" [] "Media relay sessions created.";
    MediaSessionsEndedIdle => "media_sessions_ended" ["reason" = "idle"] "Media relay sessions ended, by reason.";
    MediaSessionsEndedDeleted => "media_sessions_ended" ["reason" = "deleted"] "Media relay sessions ended, by reason.";
    MediaSessionsFailed => "media_sessions_failed" [] "Media relay session requests the dataplane refused (no free port pair, a leg address the peer policy denies).";
    MediaPackets => "media_relay_packets" [] "RTP and RTCP packets relayed between media legs.";
    MediaBytes => "media_relay_bytes" [] "RTP and RTCP bytes relayed between media legs.";
    MediaLatched => "media_latches" [] "Media leg sources learned (latching / NAT detection), re-learning within the learn window included.";
    DropMediaForeignSource => "dataplane_drops" ["reason" = "media_foreign_source"] "Packets dropped, by reason.";
    DropMediaNoRemote => "dataplane_drops" ["reason" = "media_no_remote"] "Packets dropped, by reason.";
    DropMediaPeerDenied => "dataplane_drops" ["reason" = "media_peer_denied"] "Packets dropped, by reason.";
    DropMediaSrtpAuth => "dataplane_drops" ["reason" = "media_srtp_auth"] "Packets dropped, by reason.";
    NatBindingsActive => "nat_bindings_active" [] "Static NAT map bindings (external sources) now held.";
    NatBindingsCreated => "nat_bindings_created" [] "Static NAT map bindings created.";
    NatInboundPackets => "nat_packets" ["direction" = "inbound"] "Packets forwarded through static NAT maps, by direction.";
    NatOutboundPackets => "nat_packets" ["direction" = "outbound"] "Packets forwarded through static NAT maps, by direction.";
    DropNatBindingsFull => "dataplane_drops" ["reason" = "nat_bindings_full"] "Packets dropped, by reason.";
    DropNatForeignReply => "dataplane_drops" ["reason" = "nat_foreign_reply"] "Packets dropped, by reason.";
    DropNatPeerDenied => "dataplane_drops" ["reason" = "nat_peer_denied"] "Packets dropped, by reason.";
    FastPathClientToPeerPackets => "fastpath_packets" ["direction" = "client_to_peer"] "Packets the kernel fast path relayed without user space, by direction (also counted in relay_packets, media_relay_packets or nat_packets).";
    FastPathPeerToClientPackets => "fastpath_packets" ["direction" = "peer_to_client"] "Packets the kernel fast path relayed without user space, by direction (also counted in relay_packets, media_relay_packets or nat_packets).";
    FastPathEntries => "fastpath_entries_active" [] "Channels installed in the kernel fast path.";
    FastPathMediaPackets => "fastpath_packets" ["direction" = "media"] "Packets the kernel fast path relayed without user space, by direction (also counted in relay_packets, media_relay_packets or nat_packets).";
    FastPathNatInboundPackets => "fastpath_packets" ["direction" = "nat_inbound"] "Packets the kernel fast path relayed without user space, by direction (also counted in relay_packets, media_relay_packets or nat_packets).";
    FastPathNatOutboundPackets => "fastpath_packets" ["direction" = "nat_outbound"] "Packets the kernel fast path relayed without user space, by direction (also counted in relay_packets, media_relay_packets or nat_packets).";
    FastPathMediaEntries => "fastpath_media_entries_active" [] "Media leg and NAT map directions installed in the kernel fast path.";
    TcpTurnsWoken => "dataplane_tcp_loop_turns" ["wait" = "woken"] "Turns of the TCP/TLS thread's loop, by how it waited: woken by the first event (idle), or after letting turn.tcp_coalesce_us pass since the last turn (busy).";
    TcpTurnsCoalesced => "dataplane_tcp_loop_turns" ["wait" = "coalesced"] "Turns of the TCP/TLS thread's loop, by how it waited: woken by the first event (idle), or after letting turn.tcp_coalesce_us pass since the last turn (busy).";
}

/// Slots reserved per worker; more than [`Counter::ALL`] so counters can be added without
/// moving the blocks of later workers.
pub const COUNTER_SLOTS: usize = 128;

const _: () = assert!(Counter::ALL.len() <= COUNTER_SLOTS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_index_their_slots_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn a_family_has_one_help_text_and_distinct_labels() {
        for a in Counter::ALL {
            for b in Counter::ALL {
                if a != b && a.metric() == b.metric() {
                    assert_eq!(a.help(), b.help());
                    assert_ne!(a.labels(), b.labels());
                }
            }
        }
    }
}
