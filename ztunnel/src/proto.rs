//! Generated protobuf/gRPC code (see `build.rs` and `proto/`). One module per proto
//! package, nested as the package name is; well-known types come from `prost_types`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod istio {
    pub mod v1 {
        /// `istio.v1.auth`: the CA API (`IstioCertificateService/CreateCertificate`).
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
    /// `istio.workload`: workloads and services pushed over xDS.
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    /// `istio.security`: authorization policies pushed over xDS.
    pub mod security {
        tonic::include_proto!("istio.security");
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            /// `envoy.service.discovery.v3`: delta ADS.
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// Type URLs of the xDS resources ztunnel subscribes to.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

    /// Field numbers are the wire contract with istiod: check them on encoded bytes.
    #[test]
    fn ca_messages_use_upstream_field_numbers() {
        let req = IstioCertificateRequest {
            csr: "x".into(),
            validity_duration: 5,
            metadata: Some(prost_types::Struct::default()),
        };
        // csr: field 1 (len) = 0x0a; validity_duration: field 3 (varint) = 0x18;
        // metadata: field 4 (len) = 0x22.
        assert_eq!(req.encode_to_vec(), [0x0a, 1, b'x', 0x18, 5, 0x22, 0]);
        let resp = IstioCertificateResponse {
            cert_chain: vec!["a".into()],
        };
        assert_eq!(resp.encode_to_vec(), [0x0a, 1, b'a']);
    }
}
