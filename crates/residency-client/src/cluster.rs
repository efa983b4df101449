//! Cluster status and bootstrap.

use residency_proto::pb;

use crate::{Client, ClientError, cluster_client};

impl Client {
    /// The cluster's status as the first reachable endpoint sees it.
    pub async fn status(&self) -> Result<pb::StatusResponse, ClientError> {
        self.call(pb::StatusRequest {}, |channel, request| async move {
            cluster_client(channel).status(request).await
        })
        .await
    }

    /// The first reachable endpoint's digest of its state at its applied revision.
    pub async fn digest(&self) -> Result<pb::DigestResponse, ClientError> {
        self.call(pb::DigestRequest {}, |channel, request| async move {
            cluster_client(channel).digest(request).await
        })
        .await
    }

    /// Forms a cluster of the nodes at `peer_addrs`, asking the first endpoint only (never
    /// retried elsewhere: initialising is that node's decision).
    pub async fn initialize(
        &self,
        peer_addrs: Vec<String>,
    ) -> Result<pb::InitializeResponse, ClientError> {
        let channel = self.channel(&self.endpoints()[0])?;
        let request = self.request(pb::InitializeRequest { peer_addrs }, self.options.timeout);
        cluster_client(channel)
            .initialize(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(ClientError::from_status)
    }
}
