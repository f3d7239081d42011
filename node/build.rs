//! Builds `init/surge-init.c`, the PID 1 and exec wrapper of container sandboxes, as a static
//! binary (templates have no libc: busybox-static by default). The node embeds it
//! (`runtime::container::init`). Needs a C compiler and a static libc (Debian: gcc, libc6-dev).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "init/surge-init.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let output = Command::new(&cc)
        .args(["-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out.join("surge-init"))
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` for {src}: {e}; install gcc and libc6-dev (scripts/setup)"));
    assert!(
        output.status.success(),
        "`{cc} -static {src}` failed ({}); a static libc is needed (Debian: libc6-dev):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
