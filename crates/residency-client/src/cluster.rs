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

impl Client {
    /// Adds the node at `peer_addr` as a learner (sent to the leader).
    pub async fn add_learner(
        &self,
        peer_addr: &str,
    ) -> Result<pb::MembershipResponse, ClientError> {
        let message = pb::AddLearnerRequest {
            peer_addr: peer_addr.to_string(),
        };
        self.call(message, |channel, request| async move {
            cluster_client(channel).add_learner(request).await
        })
        .await
    }

    /// Makes a learner a voter once it is within `max_lag_entries` of the leader, waiting up to
    /// `catch_up_timeout_ms` (0: the server's defaults). The client's own timeout must cover it.
    pub async fn promote(
        &self,
        node_id: u64,
        catch_up_timeout_ms: u64,
        max_lag_entries: u64,
    ) -> Result<pb::MembershipResponse, ClientError> {
        let message = pb::PromoteRequest {
            node_id,
            catch_up_timeout_ms,
            max_lag_entries,
        };
        self.call(message, |channel, request| async move {
            cluster_client(channel).promote(request).await
        })
        .await
    }

    pub async fn remove_member(&self, node_id: u64) -> Result<pb::MembershipResponse, ClientError> {
        let message = pb::RemoveMemberRequest { node_id };
        self.call(message, |channel, request| async move {
            cluster_client(channel).remove_member(request).await
        })
        .await
    }
}
