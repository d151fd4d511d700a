//! Prometheus metrics of the operator (prefix `toma_`), served on `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    /// 1 while this replica holds the Lease and runs the leader loop.
    pub leader: Gauge,
    /// The epoch this replica leads with (0 when it never led).
    pub epoch: Gauge,
    /// Topology changes written, by phase reached.
    pub transitions: Family<Labels, Counter>,
    /// Topology compare-and-swaps by result (`ok`, `conflict`, `deposed`, ...).
    pub cas_results: Family<Labels, Counter>,
    /// TomaTopology versions refused (hand edits into impossible states, invalid specs).
    pub refused_edits: Counter,
    /// Kubernetes Events that could not be published.
    pub event_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("toma");
        let leader = Gauge::default();
        let epoch = Gauge::default();
        let transitions = Family::<Labels, Counter>::default();
        let cas_results = Family::<Labels, Counter>::default();
        let refused_edits = Counter::default();
        let event_errors = Counter::default();
        registry.register(
            "operator_leader",
            "1 while this replica holds the Lease",
            leader.clone(),
        );
        registry.register(
            "operator_leader_epoch",
            "The Lease epoch this replica leads with",
            epoch.clone(),
        );
        registry.register(
            "topology_transitions",
            "Topology changes written by the leader, by phase reached",
            transitions.clone(),
        );
        registry.register(
            "topology_cas",
            "Topology compare-and-swaps, by result",
            cas_results.clone(),
        );
        registry.register(
            "topology_refused_edits",
            "TomaTopology versions refused as impossible",
            refused_edits.clone(),
        );
        registry.register(
            "operator_event_errors",
            "Kubernetes Events that could not be published",
            event_errors.clone(),
        );
        Metrics {
            registry,
            leader,
            epoch,
            transitions,
            cas_results,
            refused_edits,
            event_errors,
        }
    }
}

impl Metrics {
    pub fn cas(&self, result: &str) {
        self.cas_results
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }

    pub fn transition(&self, phase: &str) {
        self.transitions
            .get_or_create(&vec![("phase".to_string(), phase.to_string())])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_have_the_toma_prefix() {
        let m = Metrics::default();
        m.cas("conflict");
        m.transition("Degraded");
        m.leader.set(1);
        let text = m.render();
        assert!(
            text.contains("toma_topology_cas_total{result=\"conflict\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("toma_topology_transitions_total{phase=\"Degraded\"} 1"),
            "{text}"
        );
        assert!(text.contains("toma_operator_leader 1"), "{text}");
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("toma_"), "{line}");
        }
    }
}
