//! One volume member hosted by this agent: its topology as this TOMA knows it, its
//! registered clients and their acknowledgements, and its RAM locks and dirty bits.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use toma_control::RebuildProgress;
use toma_core::{Generation, MemberIdx, Role, Topology, VolumeId, VolumeSpec};
use toma_wire::transport::FrameSender;
use toma_wire::{Frame, Message, Secret};

use crate::disk::Disk;
use crate::state::{ClientId, MemberRuntime};

/// A client registered on this member.
pub struct ClientEntry {
    /// Where SWITCH_TOPO goes; `None` while disconnected.
    pub sender: Option<FrameSender>,
    /// The newest generation it acknowledged here.
    pub acked: Generation,
    /// When (this agent's clock) it started owing an acknowledgement or got disconnected.
    pub waiting_since: Option<Duration>,
    /// Connection id of the live connection (to tell a stale disconnect from a live one).
    pub conn: u64,
}

/// What one hosted member knows and holds.
pub struct Member {
    pub volume: VolumeId,
    pub name: String,
    /// The volume's spec with its size as clients see it now (it grows when an expansion
    /// is committed; see `grow.rs`).
    pub spec: Mutex<VolumeSpec>,
    pub secret: Secret,
    pub disk: Arc<Disk>,
    pub idx: Mutex<MemberIdx>,
    pub topology: Mutex<Arc<Topology>>,
    pub runtime: Mutex<Arc<MemberRuntime>>,
    pub clients: Mutex<BTreeMap<ClientId, ClientEntry>>,
    /// Until then (this agent's clock) locks are not granted: the agent restarted and waits
    /// for attached clients to re-register with their held locks.
    pub grace_until: Mutex<Option<Duration>>,
    /// Clients the control plane lists as attached when the grace period began; the grace
    /// ends early once all of them re-registered.
    pub grace_waiting: Mutex<Vec<u128>>,
    /// This TOMA lost its dirty bits while the volume was degraded (it restarted).
    pub dirty_bits_lost: Mutex<bool>,
    pub rebuild: Mutex<Option<RebuildProgress>>,
    /// Clients being fenced right now (recovery in progress).
    pub fencing: Mutex<Vec<ClientId>>,
    /// Lock holders that are not registered here (locks copied from another member, or
    /// left by an identity the client dropped), with when this agent first saw them so.
    pub orphans: Mutex<BTreeMap<ClientId, Duration>>,
    /// A growth of the extent is running (zeroing the new part).
    pub growing: AtomicBool,
    /// The extent could not grow to `.0` bytes (reported until the growth is abandoned).
    pub grow_refused: Mutex<Option<(u64, String)>>,
}

impl Member {
    pub fn spec(&self) -> VolumeSpec {
        *self.spec.lock()
    }

    pub fn idx(&self) -> MemberIdx {
        *self.idx.lock()
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.topology.lock().clone()
    }

    pub fn runtime(&self) -> Arc<MemberRuntime> {
        self.runtime.lock().clone()
    }

    pub fn role(&self) -> Role {
        let t = self.topology();
        t.members
            .get(self.idx())
            .map(|m| m.role)
            .unwrap_or(Role::Dead)
    }

    /// The generation every registered, unfenced client acknowledged.
    pub fn synced(&self) -> Generation {
        let g = self.topology().generation;
        let rt = self.runtime();
        self.clients
            .lock()
            .iter()
            .filter(|(id, _)| !rt.locks.is_fenced(**id))
            .map(|(_, c)| c.acked.min(g))
            .min()
            .unwrap_or(g)
    }

    /// Ends every client connection registered on this member: it is no longer served here
    /// (its volume left this node, or another member of the volume is served instead), so
    /// its clients must register again with whatever this node serves now.
    pub fn disconnect_clients(&self) {
        for c in self.clients.lock().values() {
            if let Some(s) = &c.sender {
                s.close();
            }
        }
    }

    /// Pushes the current topology to every connected client.
    pub async fn push_topology(&self) {
        let t = self.topology();
        let senders: Vec<FrameSender> = self
            .clients
            .lock()
            .values()
            .filter_map(|c| c.sender.clone())
            .collect();
        let frame = Frame::new(
            0,
            self.volume,
            t.generation,
            Message::SwitchTopo {
                topology: (*t).clone(),
            },
        );
        for s in senders {
            let _ = s.send(&frame).await;
        }
    }
}
