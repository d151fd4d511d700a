//! The CSI v1 gRPC contract: `csi.proto` of the CSI spec release v1.13.0 (Apache-2.0, see
//! `proto/LICENSE`), compiled at build time. `csi::v1` holds the messages and the tonic
//! `identity_server`/`controller_server`/`node_server` (and clients).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The CSI spec release this contract is.
pub const CSI_SPEC_VERSION: &str = "1.13.0";

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

pub use csi::v1;

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn services_carry_the_spec_names() {
        use tonic::server::NamedService;
        type I = v1::identity_server::IdentityServer<Nop>;
        type C = v1::controller_server::ControllerServer<Nop>;
        type N = v1::node_server::NodeServer<Nop>;
        assert_eq!(<I as NamedService>::NAME, "csi.v1.Identity");
        assert_eq!(<C as NamedService>::NAME, "csi.v1.Controller");
        assert_eq!(<N as NamedService>::NAME, "csi.v1.Node");
    }

    #[test]
    fn messages_round_trip_through_the_wire_format() {
        let req = v1::CreateVolumeRequest {
            name: "pvc-1".into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            parameters: [("raid".to_string(), "raid1".to_string())].into(),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        let back = v1::CreateVolumeRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, req);
    }

    struct Nop;
    #[tonic::async_trait]
    impl v1::identity_server::Identity for Nop {
        async fn get_plugin_info(
            &self,
            _: tonic::Request<v1::GetPluginInfoRequest>,
        ) -> Result<tonic::Response<v1::GetPluginInfoResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn get_plugin_capabilities(
            &self,
            _: tonic::Request<v1::GetPluginCapabilitiesRequest>,
        ) -> Result<tonic::Response<v1::GetPluginCapabilitiesResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn probe(
            &self,
            _: tonic::Request<v1::ProbeRequest>,
        ) -> Result<tonic::Response<v1::ProbeResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }
}
