//! The libkrun C API, behind a small trait so the VM setup can be tested with a recorder and the
//! build needs no VMM.
//!
//! **Why load at run time.** The crates.io `libkrun` crate is not a binding: it *is* the VMM
//! (krun-vmm, krun-devices, vm-memory, kvm-ioctls, an embedded guest init), built as a `cdylib`
//! and a `lib`.
//! Linking it into `surge` adds a large dependency tree to every build of the workspace, on
//! every developer machine and in CI, for a runtime that only hosts with hardware
//! virtualization can use (not this build machine). So `surge` loads `libkrun.so.1` at run time
//! (`dlopen`, through the `libloading` crate's typed symbols): the build needs nothing, hosts
//! with libkrun installed get microVMs, and a host without it gets a clear "install libkrun"
//! message from runtime selection.
//!
//! libkrun itself `dlopen`s its guest kernel, `libkrunfw.so.5`, by soname when the context is
//! created; `vm-exec` pre-loads the file it was given by path so the soname lookup finds it
//! whatever `LD_LIBRARY_PATH` says (glibc matches already-loaded objects by soname).

use std::ffi::{c_char, CStr, CString};
use std::path::Path;

use libloading::os::unix::{Library as UnixLibrary, RTLD_GLOBAL, RTLD_LOCAL, RTLD_NOW};
use libloading::{Library, Symbol};

/// libkrun reads every string array it is given as a slice of this many pointers (stopping at
/// the first null), so the arrays we pass are padded with nulls to this length.
pub const KRUN_ARRAY_SLOTS: usize = 4096;

/// Sonames tried when no explicit path is configured.
pub const LIBKRUN_SONAMES: &[&str] = &["libkrun.so.1", "libkrun.so"];

/// The libkrun calls surge makes. Return values are libkrun's: `>= 0` success (a context id for
/// `create_ctx`), a negative errno on failure. `start_enter` does not return on success.
pub trait KrunApi {
    fn set_log_level(&self, level: u32) -> i32;
    fn create_ctx(&self) -> i32;
    fn free_ctx(&self, ctx: u32) -> i32;
    fn set_vm_config(&self, ctx: u32, vcpus: u8, ram_mib: u32) -> i32;
    fn set_root(&self, ctx: u32, root: &CStr) -> i32;
    fn set_workdir(&self, ctx: u32, dir: &CStr) -> i32;
    /// `envp` is always passed (never null): with a null `envp` libkrun copies the host's
    /// environment into the guest.
    fn set_exec(&self, ctx: u32, path: &CStr, argv: &[CString], envp: &[CString]) -> i32;
    fn set_console_output(&self, ctx: u32, path: &CStr) -> i32;
    /// Map guest vsock `port` to the host unix socket `path`; with `listen`, libkrun listens on
    /// `path` and forwards each host connection to the guest's listener on `port`.
    fn add_vsock_port2(&self, ctx: u32, port: u32, path: &CStr, listen: bool) -> i32;
    fn start_enter(&self, ctx: u32) -> i32;
}

/// A null-terminated pointer array over `items`, padded to [`KRUN_ARRAY_SLOTS`]. The pointers
/// borrow from `items`, which must outlive the array's use.
pub fn c_array(items: &[CString]) -> Vec<*const c_char> {
    let mut v: Vec<*const c_char> = items.iter().map(|s| s.as_ptr()).collect();
    v.resize(KRUN_ARRAY_SLOTS.max(items.len() + 1), std::ptr::null());
    v
}

type FnVoid = unsafe extern "C" fn() -> i32;
type FnU32 = unsafe extern "C" fn(u32) -> i32;
type FnVmConfig = unsafe extern "C" fn(u32, u8, u32) -> i32;
type FnPath = unsafe extern "C" fn(u32, *const c_char) -> i32;
type FnVsockPort = unsafe extern "C" fn(u32, u32, *const c_char, bool) -> i32;
type FnExec =
    unsafe extern "C" fn(u32, *const c_char, *const *const c_char, *const *const c_char) -> i32;

/// libkrun loaded at run time. The library is never unloaded (see [`dlopen`]), so its symbols
/// live as long as the process.
pub struct DlKrun {
    set_log_level: Symbol<'static, FnU32>,
    create_ctx: Symbol<'static, FnVoid>,
    free_ctx: Symbol<'static, FnU32>,
    set_vm_config: Symbol<'static, FnVmConfig>,
    set_root: Symbol<'static, FnPath>,
    set_workdir: Symbol<'static, FnPath>,
    set_exec: Symbol<'static, FnExec>,
    set_console_output: Symbol<'static, FnPath>,
    /// `None` in a libkrun older than 1.10: a VM then gets no agent socket (exec and files
    /// fail with a message naming the missing call).
    add_vsock_port2: Option<Symbol<'static, FnVsockPort>>,
    start_enter: Symbol<'static, FnU32>,
}

/// Why libkrun (or libkrunfw) could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// Load a library by path or soname with `RTLD_NOW` (and `RTLD_GLOBAL` when `global`, so a
/// later soname lookup by another library finds it). The library is leaked on purpose: the
/// process either ends in `krun_start_enter` or only probed for libkrun, and unloading a VMM
/// (a Rust cdylib with thread-local destructors) is something nobody needs and few survive.
pub fn dlopen(name: &str, global: bool) -> Result<&'static Library, LoadError> {
    let flags = RTLD_NOW | if global { RTLD_GLOBAL } else { RTLD_LOCAL };
    // SAFETY: loading runs the library's initialisers. The names passed here are libkrun and
    // libkrunfw (from the operator's configuration or the library search path), whose
    // initialisers only set up their own statics; nothing else is loaded through this function.
    let lib =
        unsafe { UnixLibrary::open(Some(name), flags) }.map_err(|e| LoadError(e.to_string()))?;
    Ok(Box::leak(Box::new(Library::from(lib))))
}

/// The function `name` of libkrun, typed as `T`.
///
/// # Safety
/// `T` must be the exact C signature of `name` in `include/libkrun.h`.
unsafe fn sym<T>(lib: &'static Library, name: &[u8]) -> Result<Symbol<'static, T>, LoadError> {
    // SAFETY: the caller guarantees `T` matches the symbol's C type; `name` ends in NUL.
    unsafe { lib.get::<T>(name) }.map_err(|e| {
        LoadError(format!(
            "libkrun has no symbol {} (too old? libkrun >= 1.9 is needed): {e}",
            String::from_utf8_lossy(name.strip_suffix(b"\0").unwrap_or(name))
        ))
    })
}

impl DlKrun {
    /// Load libkrun from `path`, or by soname from the library search path.
    pub fn load(path: Option<&Path>) -> Result<Self, LoadError> {
        let lib = match path {
            Some(p) => dlopen(&p.to_string_lossy(), false)?,
            None => {
                let mut errors = Vec::new();
                let mut found = None;
                for name in LIBKRUN_SONAMES {
                    match dlopen(name, false) {
                        Ok(lib) => {
                            found = Some(lib);
                            break;
                        }
                        Err(e) => errors.push(e.0),
                    }
                }
                found.ok_or_else(|| LoadError(errors.join("; ")))?
            }
        };
        // SAFETY: each type below is the C signature of that libkrun function as declared in
        // include/libkrun.h (int32_t returns, uint32_t ctx ids and ports, uint8_t vCPUs, uint32_t MiB, bool flags,
        // `const char *` strings and `const char *const[]` arrays), with the C ABI.
        unsafe {
            Ok(Self {
                set_log_level: sym(lib, b"krun_set_log_level\0")?,
                create_ctx: sym(lib, b"krun_create_ctx\0")?,
                free_ctx: sym(lib, b"krun_free_ctx\0")?,
                set_vm_config: sym(lib, b"krun_set_vm_config\0")?,
                set_root: sym(lib, b"krun_set_root\0")?,
                set_workdir: sym(lib, b"krun_set_workdir\0")?,
                set_exec: sym(lib, b"krun_set_exec\0")?,
                set_console_output: sym(lib, b"krun_set_console_output\0")?,
                add_vsock_port2: sym(lib, b"krun_add_vsock_port2\0").ok(),
                start_enter: sym(lib, b"krun_start_enter\0")?,
            })
        }
    }
}

impl KrunApi for DlKrun {
    fn set_log_level(&self, level: u32) -> i32 {
        // SAFETY: the symbol has this type (see `load`); an integer argument, so libkrun reads
        // no memory of ours.
        unsafe { (*self.set_log_level)(level) }
    }
    fn create_ctx(&self) -> i32 {
        // SAFETY: the symbol has this type (see `load`) and takes no arguments.
        unsafe { (*self.create_ctx)() }
    }
    fn free_ctx(&self, ctx: u32) -> i32 {
        // SAFETY: the symbol has this type (see `load`); an integer argument (an unknown id
        // returns -ENOENT, it is not dereferenced).
        unsafe { (*self.free_ctx)(ctx) }
    }
    fn set_vm_config(&self, ctx: u32, vcpus: u8, ram_mib: u32) -> i32 {
        // SAFETY: the symbol has this type (see `load`); integer arguments only.
        unsafe { (*self.set_vm_config)(ctx, vcpus, ram_mib) }
    }
    fn set_root(&self, ctx: u32, root: &CStr) -> i32 {
        // SAFETY: the symbol has this type (see `load`); `root` is a NUL-terminated string that
        // outlives the call, and libkrun copies it before returning.
        unsafe { (*self.set_root)(ctx, root.as_ptr()) }
    }
    fn set_workdir(&self, ctx: u32, dir: &CStr) -> i32 {
        // SAFETY: the symbol has this type (see `load`); `dir` is NUL-terminated, outlives the
        // call, and libkrun copies it.
        unsafe { (*self.set_workdir)(ctx, dir.as_ptr()) }
    }
    fn set_exec(&self, ctx: u32, path: &CStr, argv: &[CString], envp: &[CString]) -> i32 {
        let argv = c_array(argv);
        let envp = c_array(envp);
        // SAFETY: the symbol has this type (see `load`). Both arrays are null-terminated and
        // KRUN_ARRAY_SLOTS long (libkrun reads that many slots), their strings outlive the call,
        // and libkrun copies what it reads.
        unsafe { (*self.set_exec)(ctx, path.as_ptr(), argv.as_ptr(), envp.as_ptr()) }
    }
    fn set_console_output(&self, ctx: u32, path: &CStr) -> i32 {
        // SAFETY: the symbol has this type (see `load`); `path` is NUL-terminated, outlives the
        // call, and libkrun copies it.
        unsafe { (*self.set_console_output)(ctx, path.as_ptr()) }
    }
    fn add_vsock_port2(&self, ctx: u32, port: u32, path: &CStr, listen: bool) -> i32 {
        let Some(f) = &self.add_vsock_port2 else {
            return -libc::ENOSYS;
        };
        // SAFETY: the symbol has this type (see `load`: `int32_t (uint32_t, uint32_t,
        // const char *, bool)`); `path` is NUL-terminated, outlives the call, and libkrun
        // copies it.
        unsafe { (**f)(ctx, port, path.as_ptr(), listen) }
    }
    fn start_enter(&self, ctx: u32) -> i32 {
        // SAFETY: the symbol has this type (see `load`); an integer argument. On success libkrun
        // runs the VM in this process and exits it with the guest's status; it returns only on
        // a setup error.
        unsafe { (*self.start_enter)(ctx) }
    }
}
