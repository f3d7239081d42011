//! The async runtime of a command-line process (`surge`, `surge-chaos`): one builder, so both
//! treat a peer that closed first the same way.

/// A multi-threaded runtime whose threads block SIGPIPE: connections are written from them, and
/// a peer that closed first (a TLS replica refusing a plaintext client) must give EPIPE there,
/// not kill the process. The main thread, which prints, keeps its own disposition (`| head` ends
/// the CLI quietly).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(block_sigpipe)
        .build()
}

/// [`runtime`], or exit with status 1 and one line saying why.
pub fn runtime_or_exit() -> tokio::runtime::Runtime {
    match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Block SIGPIPE in the calling thread: a write to a closed socket there returns EPIPE (a
/// thread-directed signal that is blocked stays pending instead of killing the process).
fn block_sigpipe() {
    // SAFETY: sigemptyset/sigaddset fill a local set; pthread_sigmask changes only this
    // thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    /// A runtime thread has SIGPIPE blocked; the thread that built the runtime does not.
    #[test]
    fn runtime_threads_block_sigpipe() {
        fn blocked() -> bool {
            // SAFETY: reads this thread's signal mask into a local set.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
                libc::sigismember(&set, libc::SIGPIPE) == 1
            }
        }
        let rt = super::runtime().expect("runtime");
        let on_worker = rt.block_on(async { tokio::spawn(async { blocked() }).await });
        assert!(on_worker.expect("task"), "a worker thread blocks SIGPIPE");
        assert!(!blocked(), "the calling thread keeps its mask");
    }
}
