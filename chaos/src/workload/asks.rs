//! What the workload's clients submit: simulated jobs, small real ones for the container nodes,
//! and checkpointable counters.

use super::{CONTAINER_CLASS, SIM_CLASS};
use crate::faults::Rng;

/// What a client asks for in one submission.
#[derive(Clone, Debug)]
pub(super) struct Ask {
    pub(super) gang: bool,
    pub(super) count: u32,
    pub(super) cpu_millis: u64,
    pub(super) memory_mib: u64,
    /// [`SIM_CLASS`] or [`CONTAINER_CLASS`].
    pub(super) class: &'static str,
    pub(super) command: Vec<String>,
    /// The sandbox user: "root" for a checkpointable counter (CRIU, run by a root without
    /// CAP_SYS_RESOURCE, cannot dump another uid's process), "" otherwise.
    pub(super) user: &'static str,
    /// A checkpointable counter the client checkpoints, resumes and forks.
    pub(super) lid: bool,
}

pub(super) fn ask(rng: &mut Rng) -> Ask {
    if rng.chance(25) {
        Ask {
            gang: true,
            count: rng.range_u32(2, 6),
            cpu_millis: 1000,
            memory_mib: 512,
            class: SIM_CLASS,
            command: vec!["true".into()],
            user: "",
            lid: false,
        }
    } else {
        Ask {
            gang: false,
            count: rng.range_u32(1, 8),
            cpu_millis: [250, 500, 1000][rng.index(3)],
            memory_mib: [256, 512, 1024][rng.index(3)],
            class: SIM_CLASS,
            command: vec!["true".into()],
            user: "",
            lid: false,
        }
    }
}

/// A checkpointable counter for the container nodes: one sandbox, as root, counting for about
/// 40 seconds of its own running time (a checkpointed counter does not count), ending at once on
/// SIGTERM.
pub(super) fn lid_ask() -> Ask {
    Ask {
        gang: false,
        count: 1,
        cpu_millis: 100,
        memory_mib: 32,
        class: CONTAINER_CLASS,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "trap 'exit 0' TERM; i=0; while [ $i -lt 80 ]; do i=$((i+1)); sleep 0.5; done".into(),
        ],
        user: "root",
        lid: true,
    }
}

/// A small real job for the container nodes: a command that ends at once, in half a second, or
/// after 6 or 20 seconds: long enough to be running when its daemon is frozen or killed, and the
/// longest outlives a daemon held down past the TTL, so that a returning node finds a copy the
/// scheduler has run elsewhere meanwhile. The long ones end at once on SIGTERM, so a cancel or a
/// returning node stops them without the kill grace.
pub(super) fn container_ask(rng: &mut Rng) -> Ask {
    let long = |secs: u32| {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("trap 'exit 0' TERM; sleep {secs} & wait"),
        ]
    };
    let command: Vec<String> = match rng.below(4) {
        0 => vec!["true".into()],
        1 => vec!["sleep".into(), "0.5".into()],
        2 => long(6),
        _ => long(20),
    };
    let gang = rng.chance(25);
    Ask {
        gang,
        count: if gang {
            rng.range_u32(2, 3)
        } else {
            rng.range_u32(1, 4)
        },
        cpu_millis: [100, 200][rng.index(2)],
        memory_mib: [32, 64][rng.index(2)],
        class: CONTAINER_CLASS,
        command,
        user: "",
        lid: false,
    }
}
