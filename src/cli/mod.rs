//! The subcommands' implementations.

pub mod bench;
pub mod chaos;
pub mod client;
pub mod demo;
pub mod dev;
pub mod etcd;
pub mod node;
pub mod output;
pub mod security;
pub mod server;
pub mod template;
pub mod vm;
