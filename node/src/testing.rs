//! Helpers for tests of this and other crates.

/// Env var that marks a CI run (CI sets `CI=true`).
const CI_ENV: &str = "CI";

/// A test cannot run here because the host lacks something it needs (root, crun, busybox ...).
/// In CI (`CI=true`) that is a broken CI machine, and a test that passes without running would
/// hide it, so this panics with `reason`. Elsewhere (a developer's laptop) it prints
/// `SKIPPED: reason` to stderr and the caller returns.
///
/// ```no_run
/// fn crun_runs() {
///     if std::process::Command::new("crun").arg("--version").status().is_err() {
///         surge_node::testing::unavailable("crun is not installed (scripts/setup installs it)");
///         return;
///     }
///     // ...
/// }
/// ```
///
/// Not for hardware limits no setup script can lift (a host whose KVM cannot boot a guest):
/// those tests print their own reason and pass everywhere.
pub fn unavailable(reason: &str) {
    match verdict(std::env::var(CI_ENV).ok().as_deref(), reason) {
        Verdict::Fail(message) => panic!("{message}"),
        Verdict::Skip(line) => eprintln!("{line}"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fail(String),
    Skip(String),
}

/// What [`unavailable`] does with `CI` set to `ci`: only `CI=true` (what CI sets) fails.
fn verdict(ci: Option<&str>, reason: &str) -> Verdict {
    if ci == Some("true") {
        return Verdict::Fail(format!(
            "this test cannot run on this machine, and CI must run it: {reason}"
        ));
    }
    Verdict::Skip(format!("SKIPPED: {reason}"))
}

/// Whether this process runs as root (namespaces, cgroups and mounts need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ci_true_makes_a_missing_tool_fatal() {
        match verdict(Some("true"), "no crun here") {
            Verdict::Fail(m) => assert!(m.contains("no crun here"), "{m}"),
            other => panic!("CI=true must fail, got {other:?}"),
        }
        for ci in [None, Some(""), Some("false"), Some("1"), Some("TRUE")] {
            assert_eq!(
                verdict(ci, "no crun here"),
                Verdict::Skip("SKIPPED: no crun here".into()),
                "CI={ci:?}"
            );
        }
    }
}
