//! The subcommands: flags, and printing what the crates return.

pub mod bench;
pub mod bench_start;
pub mod client;
pub mod cluster;
pub mod dev;
pub mod io;
pub mod life;
pub mod node;
pub mod security;
pub mod server;
pub mod template;
pub mod vm;
