//! Raw `ibv_reg_mr` / `ibv_dereg_mr` from the libibverbs sideway loaded.
//!
//! sideway's own wrappers are avoided for these two calls (see the
//! [module docs](super)): the function pointers are looked up with `dlsym`
//! in the very `libibverbs.so.1` that sideway's loader opened, so the errno
//! we report is the one libibverbs (and the kernel) set.

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

/// `struct ibv_mr *ibv_reg_mr(struct ibv_pd *, void *, size_t, int)`.
pub(super) type RegMrFn =
    unsafe extern "C" fn(pd: *mut c_void, addr: *mut c_void, length: usize, access: c_int) -> *mut c_void;
/// `int ibv_dereg_mr(struct ibv_mr *)`.
pub(super) type DeregMrFn = unsafe extern "C" fn(mr: *mut c_void) -> c_int;

/// The two entry points of the loaded libibverbs.
#[derive(Clone, Copy)]
pub(super) struct RawVerbs {
    pub(super) reg_mr: RegMrFn,
    pub(super) dereg_mr: DeregMrFn,
}

/// The head of `struct ibv_mr` (include/infiniband/verbs.h); stable ABI.
#[repr(C)]
pub(super) struct RawIbvMr {
    context: *mut c_void,
    pd: *mut c_void,
    addr: *mut c_void,
    length: usize,
    handle: u32,
    pub(super) lkey: u32,
    pub(super) rkey: u32,
}

fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc,
    // valid until the next dl* call on this thread; we copy it at once.
    unsafe {
        let p = libc::dlerror();
        if p.is_null() {
            "no dlerror text".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn load_raw_verbs() -> Result<RawVerbs, String> {
    // RTLD_NOLOAD: only find the copy sideway's loader already opened (so our
    // pointers belong to the same library instance as the PD we pass in).
    // SAFETY: dlopen with a valid C string; NOLOAD never runs initialisers.
    let h = unsafe { libc::dlopen(c"libibverbs.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if h.is_null() {
        return Err(format!(
            "libibverbs.so.1 is not loaded in this process (sideway's loader could not dlopen it: is rdma-core's libibverbs1 installed?): {}",
            dlerror_text()
        ));
    }
    let sym = |name: &CStr| -> Result<*mut c_void, String> {
        // SAFETY: h is a live handle from dlopen; name is NUL-terminated.
        let p = unsafe { libc::dlsym(h, name.as_ptr()) };
        if p.is_null() {
            Err(format!("dlsym(libibverbs.so.1, {}): {}", name.to_string_lossy(), dlerror_text()))
        } else {
            Ok(p)
        }
    };
    let reg = sym(c"ibv_reg_mr")?;
    let dereg = sym(c"ibv_dereg_mr")?;
    // SAFETY: these symbols are libibverbs' exported functions with the C
    // prototypes `struct ibv_mr *ibv_reg_mr(struct ibv_pd *, void *, size_t,
    // int)` and `int ibv_dereg_mr(struct ibv_mr *)`, which RegMrFn/DeregMrFn
    // mirror with opaque pointers.
    unsafe {
        Ok(RawVerbs {
            reg_mr: std::mem::transmute::<*mut c_void, RegMrFn>(reg),
            dereg_mr: std::mem::transmute::<*mut c_void, DeregMrFn>(dereg),
        })
    }
}

/// The raw calls, looked up once per process.
pub(super) fn raw_verbs() -> Result<RawVerbs, String> {
    static RAW: OnceLock<Result<RawVerbs, String>> = OnceLock::new();
    RAW.get_or_init(load_raw_verbs).clone()
}
