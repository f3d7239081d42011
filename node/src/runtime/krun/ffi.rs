//! The libkrun C API, behind a small trait so the VM setup can be tested with a recorder and the
//! build needs no VMM.
//!
//! **Why dlopen.** The crates.io `libkrun` crate is not a binding: it *is* the VMM (krun-vmm,
//! krun-devices, vm-memory, kvm-ioctls, an embedded guest init), built as a `cdylib` + `lib`.
//! Linking it into `surge` adds a large dependency tree to every build of the workspace, on
//! every developer machine and in CI, for a runtime that only hosts with hardware
//! virtualization can use (not this build machine). So `surge` loads `libkrun.so.1` at run time
//! with `dlopen`: the build needs nothing, hosts with libkrun installed get microVMs, and a host
//! without it gets a clear "install libkrun" message from runtime selection.
//!
//! libkrun itself `dlopen`s its guest kernel, `libkrunfw.so.5`, by soname when the context is
//! created; `vm-exec` pre-loads the file it was given by path so the soname lookup finds it
//! whatever `LD_LIBRARY_PATH` says (glibc matches already-loaded objects by soname).

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;

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
type FnExec =
    unsafe extern "C" fn(u32, *const c_char, *const *const c_char, *const *const c_char) -> i32;

/// libkrun loaded with `dlopen`. The handle is never closed: the process ends in
/// `krun_start_enter`, and unloading a VMM is not something anyone needs.
pub struct DlKrun {
    set_log_level: FnU32,
    create_ctx: FnVoid,
    free_ctx: FnU32,
    set_vm_config: FnVmConfig,
    set_root: FnPath,
    set_workdir: FnPath,
    set_exec: FnExec,
    set_console_output: FnPath,
    start_enter: FnU32,
}

/// Why libkrun (or libkrunfw) could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

fn dlerror_text() -> String {
    // SAFETY: dlerror returns null or a pointer to a NUL-terminated string valid until the next
    // dl* call on this thread; it is copied immediately.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        return "unknown dlopen error".to_owned();
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `dlopen(name, RTLD_NOW | flags)`.
pub fn dlopen(name: &str, global: bool) -> Result<*mut c_void, LoadError> {
    let c = CString::new(name).map_err(|_| LoadError(format!("{name:?} contains NUL")))?;
    let flags = libc::RTLD_NOW
        | if global {
            libc::RTLD_GLOBAL
        } else {
            libc::RTLD_LOCAL
        };
    // SAFETY: `c` is a valid NUL-terminated string; dlopen runs the library's constructors,
    // which for libkrun/libkrunfw only initialise their own statics.
    let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
    if h.is_null() {
        return Err(LoadError(dlerror_text()));
    }
    Ok(h)
}

fn sym(handle: *mut c_void, name: &CStr) -> Result<*mut c_void, LoadError> {
    // SAFETY: `handle` came from a successful dlopen and is never closed; `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        return Err(LoadError(format!(
            "libkrun has no symbol {} (too old? libkrun >= 1.9 is needed)",
            name.to_string_lossy()
        )));
    }
    Ok(p)
}

impl DlKrun {
    /// Load libkrun from `path`, or by soname from the library search path.
    pub fn load(path: Option<&Path>) -> Result<Self, LoadError> {
        let handle = match path {
            Some(p) => dlopen(&p.to_string_lossy(), false)?,
            None => {
                let mut errors = Vec::new();
                let mut found = None;
                for name in LIBKRUN_SONAMES {
                    match dlopen(name, false) {
                        Ok(h) => {
                            found = Some(h);
                            break;
                        }
                        Err(e) => errors.push(e.0),
                    }
                }
                found.ok_or_else(|| LoadError(errors.join("; ")))?
            }
        };
        // SAFETY: (all transmutes below) each symbol is the libkrun function of that name, whose C
        // signature (include/libkrun.h) is exactly the function pointer type it is cast to.
        unsafe {
            Ok(Self {
                set_log_level: std::mem::transmute::<*mut c_void, FnU32>(sym(
                    handle,
                    c"krun_set_log_level",
                )?),
                create_ctx: std::mem::transmute::<*mut c_void, FnVoid>(sym(
                    handle,
                    c"krun_create_ctx",
                )?),
                free_ctx: std::mem::transmute::<*mut c_void, FnU32>(sym(handle, c"krun_free_ctx")?),
                set_vm_config: std::mem::transmute::<*mut c_void, FnVmConfig>(sym(
                    handle,
                    c"krun_set_vm_config",
                )?),
                set_root: std::mem::transmute::<*mut c_void, FnPath>(sym(
                    handle,
                    c"krun_set_root",
                )?),
                set_workdir: std::mem::transmute::<*mut c_void, FnPath>(sym(
                    handle,
                    c"krun_set_workdir",
                )?),
                set_exec: std::mem::transmute::<*mut c_void, FnExec>(sym(
                    handle,
                    c"krun_set_exec",
                )?),
                set_console_output: std::mem::transmute::<*mut c_void, FnPath>(sym(
                    handle,
                    c"krun_set_console_output",
                )?),
                start_enter: std::mem::transmute::<*mut c_void, FnU32>(sym(
                    handle,
                    c"krun_start_enter",
                )?),
            })
        }
    }
}

impl KrunApi for DlKrun {
    fn set_log_level(&self, level: u32) -> i32 {
        // SAFETY: plain integer argument.
        unsafe { (self.set_log_level)(level) }
    }
    fn create_ctx(&self) -> i32 {
        // SAFETY: no arguments.
        unsafe { (self.create_ctx)() }
    }
    fn free_ctx(&self, ctx: u32) -> i32 {
        // SAFETY: plain integer argument; an unknown id returns -ENOENT.
        unsafe { (self.free_ctx)(ctx) }
    }
    fn set_vm_config(&self, ctx: u32, vcpus: u8, ram_mib: u32) -> i32 {
        // SAFETY: plain integer arguments.
        unsafe { (self.set_vm_config)(ctx, vcpus, ram_mib) }
    }
    fn set_root(&self, ctx: u32, root: &CStr) -> i32 {
        // SAFETY: `root` is NUL-terminated and outlives the call; libkrun copies it.
        unsafe { (self.set_root)(ctx, root.as_ptr()) }
    }
    fn set_workdir(&self, ctx: u32, dir: &CStr) -> i32 {
        // SAFETY: as for set_root.
        unsafe { (self.set_workdir)(ctx, dir.as_ptr()) }
    }
    fn set_exec(&self, ctx: u32, path: &CStr, argv: &[CString], envp: &[CString]) -> i32 {
        let argv = c_array(argv);
        let envp = c_array(envp);
        // SAFETY: both arrays are null-terminated and KRUN_ARRAY_SLOTS long (libkrun reads that
        // many slots), their strings outlive the call, and libkrun copies what it reads.
        unsafe { (self.set_exec)(ctx, path.as_ptr(), argv.as_ptr(), envp.as_ptr()) }
    }
    fn set_console_output(&self, ctx: u32, path: &CStr) -> i32 {
        // SAFETY: as for set_root.
        unsafe { (self.set_console_output)(ctx, path.as_ptr()) }
    }
    fn start_enter(&self, ctx: u32) -> i32 {
        // SAFETY: plain integer argument. On success libkrun runs the VM in this process and
        // exits it with the guest's status; it returns only on a setup error.
        unsafe { (self.start_enter)(ctx) }
    }
}
