//! Wiring: the Lease loop (kube-lease-manager) and, while this replica holds the Lease,
//! `toma_control::Leader::run` over the `KubeControlPlane`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use toma_control::{Bounded, Leader, LeaderConfig, MonotonicClock, Transition};
use tracing::{info, warn};

use crate::events::{spawn_publisher, transition_notice};
use crate::http::Health;
use crate::kube_cp::{KubeConfig, KubeControlPlane, Notice};
use crate::metrics::Metrics;

/// The longest a leader's control plane call may take before the pass gives up on it.
const LEADER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's identity in the Lease (the pod name).
    pub name: String,
    pub kube: KubeConfig,
    /// Lease duration; a standby takes over this long after the holder stops renewing.
    pub lease_duration: Duration,
    /// Renew this long before the Lease expires.
    pub lease_grace: Duration,
    /// A leader pass at least this often.
    pub interval: Duration,
    pub leader: LeaderConfig,
}

impl Health for KubeControlPlane {
    fn ready(&self) -> bool {
        KubeControlPlane::ready(self)
    }
}

/// Runs until `shutdown` turns true: elects, leads while elected, releases the Lease.
pub async fn run(
    client: Client,
    settings: Settings,
    cp: Arc<KubeControlPlane>,
    notices: mpsc::UnboundedSender<Notice>,
    notice_rx: mpsc::UnboundedReceiver<Notice>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let publisher = spawn_publisher(
        client.clone(),
        "toma-operator",
        &settings.name,
        metrics.clone(),
        notice_rx,
    );
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.kube.lease_name)
        .with_namespace(&settings.kube.lease_namespace)
        .with_identity(&settings.name)
        .with_duration(settings.lease_duration.as_secs().max(2))
        .with_grace(settings.lease_grace.as_secs().max(1))
        .with_field_manager(format!("{}-lease", settings.kube.field_manager))
        .build()
        .await
        .context("building the Lease manager")?;
    let (mut leading, lease_task) = manager.watch().await;
    let mut running: Option<(watch::Sender<bool>, JoinHandle<()>)> = None;
    loop {
        let is_leader = *leading.borrow_and_update();
        cp.set_holding_lease(is_leader);
        metrics.leader.set(i64::from(is_leader));
        match (is_leader, running.is_some()) {
            (true, false) => {
                info!(name = %settings.name, "holding the Lease; starting the leader loop");
                running = Some(start_leader(
                    &settings,
                    cp.clone(),
                    notices.clone(),
                    metrics.clone(),
                ));
            }
            (false, true) => {
                warn!(name = %settings.name, "lost the Lease; stopping the leader loop");
                stop_leader(running.take()).await;
            }
            _ => {}
        }
        tokio::select! {
            r = leading.changed() => {
                if r.is_err() {
                    warn!("the Lease manager stopped");
                    break;
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    cp.set_holding_lease(false);
    metrics.leader.set(0);
    stop_leader(running.take()).await;
    // Dropping the receiver makes the manager release the Lease and end.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(10), lease_task).await {
        Ok(Ok(Ok(_))) => info!("Lease released"),
        Ok(Ok(Err(e))) => warn!(error = %e, "releasing the Lease failed"),
        Ok(Err(e)) => warn!(error = %e, "the Lease task failed"),
        Err(_) => warn!("releasing the Lease timed out"),
    }
    drop(notices);
    publisher.abort();
    Ok(())
}

fn start_leader(
    settings: &Settings,
    cp: Arc<KubeControlPlane>,
    notices: mpsc::UnboundedSender<Notice>,
    metrics: Arc<Metrics>,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut cfg = settings.leader.clone();
    cfg.name = settings.name.clone();
    let hook = Arc::new(move |ts: &[Transition]| {
        for t in ts {
            metrics.transition(t.to.phase().as_str());
            let _ = notices.send(transition_notice(t));
        }
    });
    // Every call bounded: a pass stuck on an apiserver that stopped answering would keep the
    // leader from ever noticing anything again.
    let cp = Bounded::new(cp, LEADER_CALL_TIMEOUT);
    let leader =
        Leader::new(cp, Arc::new(MonotonicClock::default()), cfg).with_transition_hook(hook);
    let interval = settings.interval;
    let task = tokio::spawn(leader.run(interval, stop_rx));
    (stop_tx, task)
}

async fn stop_leader(running: Option<(watch::Sender<bool>, JoinHandle<()>)>) {
    if let Some((stop, task)) = running {
        let _ = stop.send(true);
        // A pass in flight is fenced by the epoch anyway; do not wait for a slow API forever.
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            warn!("the leader loop did not stop in time");
        }
    }
}
