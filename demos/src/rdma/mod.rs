//! RDMA verbs for pinlab through `sideway`: open a device, register memory,
//! and move data with one-sided RDMA WRITEs and READs over an RC queue pair.
//!
//! `ibv_reg_mr` and `ibv_dereg_mr` are called through function pointers
//! looked up with `dlsym` in the very `libibverbs.so.1` that sideway's loader
//! opened, so the errno we report is the one libibverbs (and the kernel) set,
//! captured immediately after the call. sideway's own wrappers are avoided for
//! these two calls because (a) its MR type deregisters only in `Drop`,
//! discarding `ibv_dereg_mr`'s result, and (b) its static loader stub answers
//! *every* call with `EOPNOTSUPP` when libibverbs could not be loaded, which
//! is exactly the errno the stock kernel gives for FS-DAX, so a broken rootfs
//! would look like a correct result.
//!
//! The pieces: `verbs` (those two raw calls), `device` (device, port, GIDs,
//! MRs), `pattern` (the bytes the client writes), `channel` (the TCP side
//! channel), `qp` (the RC queue pair), `server` and `client`; everything
//! public is re-exported here.

use std::io;

use sideway::ibverbs::AccessFlags;

use crate::StepError;

mod channel;
mod client;
mod device;
mod pattern;
mod qp;
mod server;
mod verbs;

pub use client::{client_read, client_transfer, client_write, ClientOp, ClientReport, READ_FILL};
pub use device::{preload, Device, Mr};
pub use pattern::{
    fill_pattern, first_pattern_mismatch, pattern_block_index, BlockCensus, UniformBlocks, DEFAULT_SEED,
};
pub use qp::wc_status_name;
pub use server::{read_from_client, serve_write, write_from_client};

/// The HCA port pinlab uses (rxe has exactly one).
pub const PORT: u8 = 1;

/// Largest RDMA WRITE we post in one work request.
pub const MAX_CHUNK: usize = 1 << 20;

/// Send-queue depth (and the number of WRITEs kept in flight) on the client.
const SEND_DEPTH: u32 = 32;

/// Longest side-channel line we accept.
const MAX_LINE: u64 = 64 << 10;

/// `IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ`:
/// for MRs and for the QPs (a responder QP needs remote read access, and
/// the MR too, before it serves an RDMA READ). Remote read takes no
/// different path in `ib_umem_get()`: write access alone decides FOLL_WRITE.
fn mr_access() -> AccessFlags {
    AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead
}

/// How [`mr_access`] reads in C, for messages.
const MR_ACCESS_TEXT: &str = "IBV_ACCESS_LOCAL_WRITE|IBV_ACCESS_REMOTE_WRITE|IBV_ACCESS_REMOTE_READ";

/// Access of a read-only MR: the remote side may only read it, so the
/// kernel pins its pages without write intent.
fn mr_access_read_only() -> AccessFlags {
    AccessFlags::RemoteRead
}

/// How [`mr_access_read_only`] reads in C, for messages.
const MR_ACCESS_READ_ONLY_TEXT: &str = "IBV_ACCESS_REMOTE_READ";

// ---------------------------------------------------------------------------
// errno out of sideway's error types.

fn io_text(e: &io::Error) -> (Option<i32>, String) {
    (e.raw_os_error(), e.to_string())
}

fn step(errno: Option<i32>, message: String) -> StepError {
    StepError::maybe_errno(errno, message)
}
