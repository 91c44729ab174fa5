//! The egress relay's kernel program (its own object, loaded by the daemon's egress endpoint, not
//! pinned: it lives as long as the sockets it serves). Each socket of a server-name-checked
//! connection (the agent's, accepted by the endpoint, and the daemon's upstream one) sits in
//! `RELAY_SOCKETS` under its socket cookie; `RELAY_PEERS` names the other socket of the pair. The
//! stream verdict sends every received chunk out of the peer: the bytes pass from one TCP
//! connection to the other inside the kernel, without waking the daemon. Counting, end of stream
//! and clean-up stay in user space (`egress/relay.rs`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};

/// Sized by the daemon at load (its bound on kernel-relayed connections, two sockets each).
#[map]
static RELAY_SOCKETS: SockHash<u64> = SockHash::with_max_entries(2, 0);

/// Socket cookie → the cookie of the other socket of its connection.
#[map]
static RELAY_PEERS: HashMap<u64, u64> = HashMap::with_max_entries(2, 0);

/// sk_skb/stream_verdict: runs for every chunk a socket in `RELAY_SOCKETS` receives.
#[stream_verdict]
pub fn egress_relay(ctx: SkBuffContext) -> u32 {
    // The end of stream comes as an empty chunk: redirected, the peer's sending of nothing would
    // count as a failure and stop its relaying (EPIPE). Left to the socket itself, it is the end
    // of stream user space sees and passes on.
    if ctx.len() == 0 {
        return sk_action::SK_PASS;
    }
    // SAFETY: the helper reads the context's socket; the verifier checks the argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a plain value copied out of the map.
    match unsafe { RELAY_PEERS.get(&cookie) } {
        // SK_PASS when the peer's socket is gone (redirect fails: SK_DROP) is not possible:
        // the helper decides. User space writes the peers before inserting either socket and
        // removes them only after both are closed, so every lookup finds its peer.
        Some(peer) => RELAY_SOCKETS.redirect_skb(&ctx, *peer, 0) as u32,
        // Not ours (never happens, see above): leave the bytes to the socket's own reader.
        None => sk_action::SK_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
