//! surge's guest agent for microVMs, and its host-side client.
//!
//! A libkrun microVM has no `crun exec`: the only ways in are its devices. So every krun
//! sandbox boots this crate's binary, `surge-guest`, as its workload (under libkrun's own init,
//! as PID 1's only child and a child subreaper, or as PID 1 itself); it mounts what the guest
//! needs, runs the sandbox's command (if any) and serves exec and file requests on vsock port
//! [`proto::AGENT_VSOCK_PORT`]. libkrun maps that port to a unix socket on the host
//! (`krun_add_vsock_port2(..., listen = true)`), `<vm dir>/agent.sock`, where the node's krun
//! runtime connects with [`client::Client`].
//!
//! ```text
//!  node daemon (host)                       guest (microVM)
//!  ──────────────────                       ───────────────
//!  KrunRuntime: SandboxIo                   surge-guest (agent)
//!    └─ client::Client ── agent.sock ══ vsock:1024 ══► agent::Agent::serve
//!         Call per request  (frames: proto)            one task per request:
//!         (exec, files)                                exec (process group, as the user),
//!                                                      read/write/list, tar down/up
//! ```
//!
//! * [`proto`]: framing (length-prefixed JSON header + raw payload), hello/version, request
//!   ids, per-kind caps, credit-based flow control.
//! * [`agent`]: the guest side. It runs as an ordinary process too (`surge-guest --root DIR
//!   --listen-unix SOCKET`), which is how it is tested end to end on hosts that cannot boot a
//!   microVM.
//! * [`client`]: the host side.
//! * [`member`]: the tar member rule of uploads (the node's own, kept equal by a test there).
//!
//! Build the binary static for the guest with `guest/scripts/build-static` (not part of the
//! workspace build: the guest's libc is not the host's).

pub mod agent;
pub mod client;
pub mod member;
pub mod mux;
pub mod proto;

#[cfg(test)]
mod tests;
