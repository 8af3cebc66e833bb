//! Prometheus metrics for `/metrics`: agents connected by transport, handshakes by result, frames in and out,
//! and how busy the core's thread is.

use ct_protocol::Transport;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A transport as a label value: `quic` or `websocket`, the same words logs and `admin agents` use.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct TransportLabel(Transport);

impl EncodeLabelValue for TransportLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_str())
    }
}

impl From<Transport> for TransportLabel {
    fn from(t: Transport) -> Self {
        Self(t)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: TransportLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub transport: TransportLabel,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoreLabels {
    /// What the core's thread was doing: `jobs` (decisions: submissions, sessions, cancels...), `events`
    /// (checking task events and handing them to the store), and in a cluster `settle` (waiting for event
    /// writes in flight to land before a decision) and `writers` (waiting for a free event writer).
    pub part: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `limit` (the relay's connection limit) or `per_address` (that address holds its share).
    pub reason: &'static str,
}

/// Every metric the relay exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub agents_connected: Family<TransportLabels, Gauge>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub frames_in: Family<TransportLabels, Counter>,
    pub frames_out: Family<TransportLabels, Counter>,
    pub pairings: Counter<u64, AtomicU64>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// Seconds the core's thread spent on each part of its work. All parts together near one second per
    /// second: the thread is saturated, and every decision on the node waits in its queue.
    pub core_busy: Family<CoreLabels, Counter<f64, AtomicU64>>,
    /// The node these figures are from, a label on every metric (several nodes feed one Prometheus).
    pub node: String,
}

impl Metrics {
    pub fn for_node(node: &str) -> Self {
        Self {
            node: node.to_string(),
            ..Self::default()
        }
    }

    /// The connected-agents gauge for one transport (a shared handle: updating it updates the metric).
    pub fn agents(&self, t: Transport) -> Gauge {
        self.agents_connected
            .get_or_create(&TransportLabels {
                transport: t.into(),
            })
            .clone()
    }

    /// Counts one handshake outcome.
    pub fn handshake(&self, t: Transport, result: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                transport: t.into(),
                result,
            })
            .inc();
    }

    /// The frame counters for one transport, fetched once per session so counting a frame takes no lock.
    pub fn frames(&self, t: Transport) -> (Counter, Counter) {
        let labels = TransportLabels {
            transport: t.into(),
        };
        (
            self.frames_in.get_or_create(&labels).clone(),
            self.frames_out.get_or_create(&labels).clone(),
        )
    }

    /// Counts one connection refused at accept. Refusals are counted rather than logged one by one: a flood
    /// would otherwise flood the log as well.
    pub fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
    }

    /// The core thread's counter for `part` (see [`CoreLabels`]), fetched once by the thread.
    pub fn core_busy(&self, part: &'static str) -> Counter<f64, AtomicU64> {
        self.core_busy.get_or_create(&CoreLabels { part }).clone()
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let mut registry = if self.node.is_empty() {
            Registry::with_prefix("ct_relay")
        } else {
            Registry::with_prefix_and_labels(
                "ct_relay",
                [("node".into(), self.node.clone().into())].into_iter(),
            )
        };
        registry.register(
            "agents_connected",
            "Agents with a live session",
            self.agents_connected.clone(),
        );
        registry.register(
            "handshakes",
            "Agent handshakes by result",
            self.handshakes.clone(),
        );
        registry.register(
            "frames_in",
            "Frames received from agents",
            self.frames_in.clone(),
        );
        registry.register(
            "frames_out",
            "Frames sent to agents",
            self.frames_out.clone(),
        );
        registry.register("pairings", "Agents paired", self.pairings.clone());
        registry.register(
            "connections_refused",
            "Connections refused at accept, by reason",
            self.connections_refused.clone(),
        );
        registry.register(
            "core_busy_seconds",
            "Seconds the core's thread spent working, by part",
            self.core_busy.clone(),
        );
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
