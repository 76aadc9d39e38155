//! The RC queue pair both ends of an RDMA WRITE or READ bring up.

use std::io;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{BasicCompletionQueue, CreateCompletionQueueErrorKind, GenericCompletionQueue};
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, CreateQueuePairErrorKind, ModifyQueuePairErrorKind, QueuePair, QueuePairAttribute, QueuePairState,
};

use super::channel::Endpoint;
use super::device::{mtu_from_bytes, mtu_from_ibv, Device, Mr, PORT_ACTIVE};
use super::{io_text, mr_access, step, PORT};
use crate::StepError;

fn modify_errno(kind: &ModifyQueuePairErrorKind) -> Option<i32> {
    match kind {
        ModifyQueuePairErrorKind::Ibverbs(e) => e.raw_os_error(),
        ModifyQueuePairErrorKind::InvalidTransition { source, .. }
        | ModifyQueuePairErrorKind::InvalidAttributeMask { source, .. }
        | ModifyQueuePairErrorKind::ResolveRouteTimedout { source, .. }
        | ModifyQueuePairErrorKind::NetworkUnreachable { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// A completion queue and an RC queue pair on it, with our side's GID and PSN.
pub(super) struct RcQp {
    pub(super) cq: Arc<BasicCompletionQueue>,
    pub(super) qp: BasicQueuePair,
    device: String,
    psn: u32,
    gid_index: u8,
    gid: Gid,
    pub(super) gid_text: String,
    mtu_bytes: u32,
    pub(super) max_msg: u32,
}

fn initial_psn() -> u32 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (nanos ^ (std::process::id() << 7)) & 0x00ff_ffff
}

impl RcQp {
    /// CQ + RC QP on `dev`, moved to INIT, with our GID and PSN chosen.
    pub(super) fn new(dev: &Device, send_depth: u32) -> Result<RcQp, StepError> {
        let port = dev.port_attr()?;
        if port.state != PORT_ACTIVE {
            return Err(StepError::errno(
                libc::ENETDOWN,
                format!(
                    "port {PORT} of {} is not ACTIVE (ibv_port_state {}); is the netdev under it up?",
                    dev.name, port.state
                ),
            ));
        }
        let (_, mtu_bytes) = mtu_from_ibv(port.active_mtu).ok_or_else(|| {
            StepError::other(format!("{} port {PORT} reports an unknown active_mtu {}", dev.name, port.active_mtu))
        })?;
        let (gid_index, gid, gid_text) = dev.pick_gid(port.gid_tbl_len)?;

        let cqe = send_depth * 2 + 2;
        let cq = dev.ctx.create_cq_builder().setup_cqe(cqe).build().map_err(|e| {
            let (errno, text) = match &e.0 {
                CreateCompletionQueueErrorKind::Ibverbs(io) => io_text(io),
                other => (None, other.to_string()),
            };
            step(errno, format!("ibv_create_cq({}, cqe={cqe}): {text}", dev.name))
        })?;
        let qp = dev
            .pd
            .create_qp_builder()
            .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&cq)))
            .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&cq)))
            .setup_max_send_wr(send_depth)
            .setup_max_recv_wr(1)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .build()
            .map_err(|e| {
                let (errno, text) = match &e.0 {
                    CreateQueuePairErrorKind::Ibverbs(io) => io_text(io),
                    other => (None, other.to_string()),
                };
                step(errno, format!("ibv_create_qp({}, RC, max_send_wr={send_depth}): {text}", dev.name))
            })?;
        let mut rc = RcQp {
            cq,
            qp,
            device: dev.name.clone(),
            psn: initial_psn(),
            gid_index,
            gid,
            gid_text,
            mtu_bytes,
            max_msg: port.max_msg_sz,
        };
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init).setup_pkey_index(0).setup_port(PORT).setup_access_flags(mr_access());
        rc.modify(&attr, "INIT (pkey_index=0, port=1, access=LOCAL_WRITE|REMOTE_WRITE|REMOTE_READ)")?;
        Ok(rc)
    }

    fn modify(&mut self, attr: &QueuePairAttribute, what: &str) -> Result<(), StepError> {
        let qpn = self.qp.qp_number();
        self.qp.modify(attr).map_err(|e| {
            let errno = modify_errno(&e.0);
            let text = match errno {
                Some(n) => format!("{e}: {}", io::Error::from_raw_os_error(n)),
                None => e.to_string(),
            };
            step(errno, format!("ibv_modify_qp({}, qpn={qpn:#x}) to {what}: {text}", self.device))
        })
    }

    pub(super) fn endpoint(&self, mr: Option<&Mr>) -> Endpoint {
        Endpoint {
            device: self.device.clone(),
            qpn: self.qp.qp_number(),
            psn: self.psn,
            gid: Ipv6Addr::from(self.gid.raw),
            gid_index: self.gid_index,
            mtu: self.mtu_bytes,
            addr: mr.map(|m| m.addr() as u64).unwrap_or(0),
            len: mr.map(|m| m.len() as u64).unwrap_or(0),
            rkey: mr.map(|m| m.rkey()).unwrap_or(0),
        }
    }

    /// The path MTU both sides can use.
    pub(super) fn path_mtu(&self, remote: &Endpoint) -> Result<(Mtu, u32), StepError> {
        let bytes = self.mtu_bytes.min(remote.mtu);
        let mtu = mtu_from_bytes(bytes)
            .ok_or_else(|| StepError::errno(libc::EPROTO, format!("peer sent an invalid MTU {}", remote.mtu)))?;
        Ok((mtu, bytes))
    }

    /// INIT -> RTR -> RTS towards `remote`.
    pub(super) fn connect(&mut self, remote: &Endpoint) -> Result<(), StepError> {
        let (mtu, mtu_bytes) = self.path_mtu(remote)?;
        let remote_gid = Gid::from(remote.gid);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(0).setup_port(PORT).setup_service_level(0).setup_grh(&remote_gid, 0, self.gid_index, 64, 0);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            // Incoming RDMA READs this QP serves at once (0 would refuse every READ).
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&ah);
        self.modify(
            &attr,
            &format!(
                "RTR (path_mtu={mtu_bytes}, dest_qpn={:#x}, rq_psn={:#x}, dgid={}, sgid_index={}, max_dest_rd_atomic=1)",
                remote.qpn, remote.psn, remote.gid, self.gid_index
            ),
        )?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(16)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            // RDMA READs this QP has outstanding at once (0 would stall every READ).
            .setup_max_read_atomic(1);
        self.modify(
            &attr,
            &format!("RTS (sq_psn={:#x}, timeout=16, retry_cnt=7, rnr_retry=7, max_rd_atomic=1)", self.psn),
        )
    }
}

/// `ibv_wc_status_str`-style names for work-completion status codes.
pub fn wc_status_name(status: u32) -> &'static str {
    const NAMES: [&str; 24] = [
        "IBV_WC_SUCCESS",
        "IBV_WC_LOC_LEN_ERR",
        "IBV_WC_LOC_QP_OP_ERR",
        "IBV_WC_LOC_EEC_OP_ERR",
        "IBV_WC_LOC_PROT_ERR",
        "IBV_WC_WR_FLUSH_ERR",
        "IBV_WC_MW_BIND_ERR",
        "IBV_WC_BAD_RESP_ERR",
        "IBV_WC_LOC_ACCESS_ERR",
        "IBV_WC_REM_INV_REQ_ERR",
        "IBV_WC_REM_ACCESS_ERR",
        "IBV_WC_REM_OP_ERR",
        "IBV_WC_RETRY_EXC_ERR",
        "IBV_WC_RNR_RETRY_EXC_ERR",
        "IBV_WC_LOC_RDD_VIOL_ERR",
        "IBV_WC_REM_INV_RD_REQ_ERR",
        "IBV_WC_REM_ABORT_ERR",
        "IBV_WC_INV_EECN_ERR",
        "IBV_WC_INV_EEC_STATE_ERR",
        "IBV_WC_FATAL_ERR",
        "IBV_WC_RESP_TIMEOUT_ERR",
        "IBV_WC_GENERAL_ERR",
        "IBV_WC_TM_ERR",
        "IBV_WC_TM_RNDV_INCOMPLETE",
    ];
    NAMES.get(status as usize).copied().unwrap_or("IBV_WC_<unknown>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sideway::ibverbs::completion::WorkCompletionStatus;

    #[test]
    fn wc_status_names_match_libibverbs() {
        assert_eq!(wc_status_name(WorkCompletionStatus::Success as u32), "IBV_WC_SUCCESS");
        assert_eq!(wc_status_name(WorkCompletionStatus::RemoteAccessError as u32), "IBV_WC_REM_ACCESS_ERR");
        assert_eq!(wc_status_name(WorkCompletionStatus::RetryCounterExceededError as u32), "IBV_WC_RETRY_EXC_ERR");
        assert_eq!(wc_status_name(WorkCompletionStatus::GeneralError as u32), "IBV_WC_GENERAL_ERR");
        assert_eq!(wc_status_name(999), "IBV_WC_<unknown>");
    }
}
