//! The locality labels Istio's ztunnel adds to `istio_tcp_*`: `source_region`,
//! `source_zone`, `destination_region`, `destination_zone`. Like upstream, all four are
//! there (`unknown` where a side has none) whenever either end's workload is known, and
//! none of them when neither is (an attempt refused before anything was identified).

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};

use super::{Label, PeerLabels, KNOWN};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalityLabels {
    pub source_region: Label,
    pub source_zone: Label,
    pub destination_region: Label,
    pub destination_zone: Label,
}

/// The four labels, or none of them. Encoded last (the label-set encoder is consumed by
/// a flattened set).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Locality(pub Option<LocalityLabels>);

impl Locality {
    /// Of the two ends' workloads, as far as they are known.
    pub fn of(src: Option<&PeerLabels>, dst: Option<&PeerLabels>) -> Locality {
        if src.is_none() && dst.is_none() {
            return Locality(None);
        }
        let u = || KNOWN.unknown.clone();
        Locality(Some(LocalityLabels {
            source_region: src.map_or_else(u, |p| p.region.clone()),
            source_zone: src.map_or_else(u, |p| p.zone.clone()),
            destination_region: dst.map_or_else(u, |p| p.region.clone()),
            destination_zone: dst.map_or_else(u, |p| p.zone.clone()),
        }))
    }
}

impl EncodeLabelSet for Locality {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(l) => l.encode(encoder),
            None => Ok(()),
        }
    }
}
