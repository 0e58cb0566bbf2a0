//! Istio ztunnel's `istio_xds_*` family, under its names and labels, so dashboards and
//! alerts written for it read ours: how streams to the control plane ended, and how many
//! responses (and resource bytes) arrived per type URL.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

/// How an xDS stream ended; the values are upstream's `reason` label values.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Termination {
    /// No stream was opened: the server could not be reached, refused the call or did
    /// not answer it in time.
    ConnectionError,
    /// The stream failed with a status that means something is wrong (or failed on our
    /// side): reconnected with backoff.
    Error,
    /// The stream ended with a status servers use for an ordinary close (istiod's
    /// connection age limit, a GOAWAY, a cancelled or timed-out stream).
    Reconnect,
    /// The server ended the stream without an error.
    Complete,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminationLabels {
    pub reason: Termination,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeUrlLabels {
    pub url: String,
}

/// Cheap to clone: every clone counts into the same series.
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    /// `istio_xds_connection_terminations_total{reason}`.
    pub terminations: Family<TerminationLabels, Counter>,
    /// `istio_xds_message_total{url}`: responses received.
    pub messages: Family<TypeUrlLabels, Counter>,
    /// `istio_xds_message_bytes_total{url}`: the encoded size of the resources they
    /// carried (as upstream counts it: the resources' `Any` payloads, not the envelope).
    pub message_bytes: Family<TypeUrlLabels, Counter>,
}

impl XdsMetrics {
    /// Registers the family on `istio`, the registry with the `istio` prefix.
    pub fn register(&self, istio: &mut Registry) {
        istio.register(
            "xds_connection_terminations",
            "xDS streams to the control plane that ended, by how they ended",
            self.terminations.clone(),
        );
        istio.register(
            "xds_message",
            "xDS responses received, by type URL",
            self.messages.clone(),
        );
        istio.register_with_unit(
            "xds_message",
            "Bytes of resources received in xDS responses, by type URL",
            Unit::Bytes,
            self.message_bytes.clone(),
        );
    }

    pub fn terminated(&self, reason: Termination) {
        self.terminations
            .get_or_create(&TerminationLabels { reason })
            .inc();
    }

    /// One response of `type_url` whose resources held `bytes` bytes.
    pub fn received(&self, type_url: &str, bytes: u64) {
        let l = TypeUrlLabels {
            url: type_url.to_string(),
        };
        self.messages.get_or_create(&l).inc();
        self.message_bytes.get_or_create(&l).inc_by(bytes);
    }
}
