//! Kubernetes Events on `TomaTopology` objects: one per topology change (Normal,
//! `TopologyChanged`) and one per refused version (Warning, reason = the category).

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use toma_control::Transition;
use toma_crds::TomaTopology;
use tracing::warn;

use crate::kube_cp::Notice;
use crate::metrics::Metrics;

/// The Event for one topology change the leader wrote.
pub fn transition_notice(t: &Transition) -> Notice {
    Notice {
        topology: t.name.clone(),
        warning: false,
        reason: "TopologyChanged".into(),
        note: format!(
            "{} -> {} (members {})",
            t.from,
            t.to,
            t.to.members_summary()
        ),
    }
}

/// Publishes every notice as an Event until the sending side is dropped.
pub fn spawn_publisher(
    client: Client,
    controller: &str,
    instance: &str,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Notice>,
) -> JoinHandle<()> {
    let reporter = Reporter {
        controller: controller.to_string(),
        instance: Some(instance.to_string()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let topologies: Api<TomaTopology> = Api::all(client);
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            let uid = topologies.get(&n.topology).await.ok().and_then(|o| o.uid());
            let reference = ObjectReference {
                api_version: Some("toma.io/v1alpha1".into()),
                kind: Some("TomaTopology".into()),
                name: Some(n.topology.clone()),
                uid,
                ..ObjectReference::default()
            };
            let ev = Event {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.clone(),
                note: Some(n.note.chars().take(1024).collect()),
                action: if n.warning { "Refuse" } else { "Plan" }.into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &reference).await {
                metrics.event_errors.inc();
                warn!(topology = %n.topology, reason = %n.reason, error = %e, "could not publish an Event");
            }
        }
    })
}
