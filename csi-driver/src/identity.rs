//! The CSI Identity service: plugin info, capabilities and a probe that reflects readiness.

use std::sync::Arc;

use csi_proto::v1;
use csi_proto::v1::identity_server::Identity;
use tonic::{Request, Response, Status};

use crate::DRIVER_NAME;

/// Why the plugin is not ready, or `None` when it is.
pub type Readiness = Arc<dyn Fn() -> Option<String> + Send + Sync>;

pub struct IdentityService {
    /// Which mode this process serves (for logs).
    pub controller: bool,
    pub ready: Readiness,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<v1::GetPluginInfoRequest>,
    ) -> Result<Response<v1::GetPluginInfoResponse>, Status> {
        Ok(Response::new(v1::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<v1::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<v1::GetPluginCapabilitiesResponse>, Status> {
        use v1::plugin_capability::service::Type;
        let svc = |t: Type| v1::PluginCapability {
            r#type: Some(v1::plugin_capability::Type::Service(
                v1::plugin_capability::Service { r#type: t as i32 },
            )),
        };
        // The plugin as a whole (one binary in two modes) provides the Controller service,
        // so both modes say so: COs and csi-sanity ask the node endpoint too.
        // Volumes grow while attached and in use (ONLINE): the node grows the device and
        // the file system under the running workload.
        let expansion = v1::PluginCapability {
            r#type: Some(v1::plugin_capability::Type::VolumeExpansion(
                v1::plugin_capability::VolumeExpansion {
                    r#type: v1::plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        };
        let caps = vec![
            svc(Type::ControllerService),
            svc(Type::VolumeAccessibilityConstraints),
            expansion,
        ];
        Ok(Response::new(v1::GetPluginCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn probe(
        &self,
        _: Request<v1::ProbeRequest>,
    ) -> Result<Response<v1::ProbeResponse>, Status> {
        match (self.ready)() {
            None => Ok(Response::new(v1::ProbeResponse { ready: Some(true) })),
            Some(why) => {
                tracing::info!(%why, "probe: not ready");
                Ok(Response::new(v1::ProbeResponse { ready: Some(false) }))
            }
        }
    }
}
