//! The same workloads against etcd, over etcd's own gRPC API (v3), with the few messages the
//! benchmark needs declared here by their field numbers in etcd's `rpc.proto`: `KV.Range`,
//! `KV.Put` and `Maintenance.Status`. Keys are `user/<id>`, values as long as an encoded
//! placement. Writes and linearizable reads go to the leader (what etcd's own `benchmark` tool
//! does with `--endpoints` set to the leader); serializable reads rotate over all members.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

use crate::driver::{Op, scatter};
use crate::{Plan, Workload, preload_user_id};

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bool, tag = "7")]
    pub serializable: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    #[prost(int64, tag = "4")]
    pub count: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(uint64, tag = "4")]
    pub leader: u64,
}

/// The deadline of one etcd call, as the registry's client has one: a hung call fails the run
/// instead of hanging it.
const ETCD_CALL_TIMEOUT_S: u64 = 30;
/// Puts in flight while preloading.
const PRELOAD_PUTS_IN_FLIGHT: usize = 64;

const RANGE: &str = "/etcdserverpb.KV/Range";
const PUT: &str = "/etcdserverpb.KV/Put";
const STATUS: &str = "/etcdserverpb.Maintenance/Status";

/// One unary call on a channel.
async fn unary<Req, Resp>(
    channel: Channel,
    path: &'static str,
    request: Req,
) -> Result<Resp, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| format!("etcd connection: {error}"))?;
    grpc.unary(
        tonic::Request::new(request),
        PathAndQuery::from_static(path),
        ProstCodec::<Req, Resp>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
    .map_err(|status| format!("etcd: {:?}: {}", status.code(), status.message()))
}

/// Connections to every member, and which of them leads.
#[derive(Debug)]
pub struct Etcd {
    channels: Vec<Channel>,
    leader: usize,
    turn: AtomicUsize,
}

impl Etcd {
    /// Connects to `endpoints` (host:port) and asks each for its status to find the leader.
    pub async fn connect(endpoints: &[String]) -> anyhow::Result<Etcd> {
        let mut channels = Vec::new();
        let mut leader = None;
        for (index, address) in endpoints.iter().enumerate() {
            let channel = Endpoint::from_shared(format!("http://{address}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(ETCD_CALL_TIMEOUT_S))
                .connect_lazy();
            let status: StatusResponse = unary(channel.clone(), STATUS, StatusRequest {})
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("the status of etcd member {address}"))?;
            let member = status.header.map_or(0, |header| header.member_id);
            if status.leader != 0 && status.leader == member {
                leader = Some(index);
            }
            channels.push(channel);
        }
        let Some(leader) = leader else {
            bail!("no etcd member says it leads: is the cluster up and has it elected?");
        };
        Ok(Etcd {
            channels,
            leader,
            turn: AtomicUsize::new(0),
        })
    }

    fn leader(&self) -> Channel {
        self.channels[self.leader].clone()
    }

    fn next(&self) -> Channel {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        self.channels[turn % self.channels.len()].clone()
    }

    async fn get(&self, key: Vec<u8>, serializable: bool) -> Result<RangeResponse, String> {
        let channel = if serializable {
            self.next()
        } else {
            self.leader()
        };
        unary(channel, RANGE, RangeRequest { key, serializable }).await
    }

    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<PutResponse, String> {
        unary(self.leader(), PUT, PutRequest { key, value }).await
    }
}

fn key_of(user_id: &str) -> Vec<u8> {
    format!("user/{user_id}").into_bytes()
}

/// Connections for `plan.clients` clients, each with its own channel to every member.
pub async fn connect_all(plan: &Plan) -> anyhow::Result<Vec<Arc<Etcd>>> {
    let mut clients = Vec::with_capacity(plan.clients);
    for _ in 0..plan.clients {
        clients.push(Arc::new(Etcd::connect(&plan.endpoints).await?));
    }
    Ok(clients)
}

/// Puts `plan.users` keys, unless the last of them is there already.
pub async fn preload(clients: &[Arc<Etcd>], plan: &Plan) -> anyhow::Result<()> {
    let etcd = clients[0].clone();
    let last = etcd
        .get(key_of(&preload_user_id(plan.users - 1)), false)
        .await
        .map_err(anyhow::Error::msg)?;
    if !last.kvs.is_empty() {
        println!("etcd: {} keys already loaded", plan.users);
        return Ok(());
    }
    let value = vec![b'v'; plan.value_bytes];
    let op: Op = Arc::new(move |_, seq| {
        let (etcd, value) = (etcd.clone(), value.clone());
        Box::pin(async move {
            etcd.put(key_of(&preload_user_id(seq as usize)), value)
                .await
                .map(|_| 1)
        })
    });
    crate::preload_with(op, plan.users, PRELOAD_PUTS_IN_FLIGHT, "etcd").await
}

/// The operation of one workload against etcd, `None` where etcd has no counterpart.
/// New keys are named within `scope`, unique to one round of one workload.
pub fn op_for(
    workload: Workload,
    clients: &[Arc<Etcd>],
    plan: &Plan,
    scope: &str,
) -> Option<(Op, String)> {
    let clients: Arc<Vec<Arc<Etcd>>> = Arc::new(clients.to_vec());
    let users = plan.users as u64;
    let run = scope.to_string();
    match workload {
        Workload::LookupLinearizable
        | Workload::LookupLinearizableOne
        | Workload::LookupAtLeast
        | Workload::LookupStale => {
            let serializable = matches!(workload, Workload::LookupAtLeast | Workload::LookupStale);
            let what = if serializable {
                "Range, serializable"
            } else {
                "Range, linearizable"
            };
            let op: Op = Arc::new(move |task, seq| {
                let etcd = clients[task % clients.len()].clone();
                Box::pin(async move {
                    let key = key_of(&preload_user_id((scatter(seq) % users) as usize));
                    let answer = etcd.get(key, serializable).await?;
                    if answer.kvs.is_empty() {
                        return Err("a preloaded key is missing".to_string());
                    }
                    Ok(1)
                })
            });
            Some((op, what.to_string()))
        }
        Workload::Assign(_) => {
            let value = vec![b'v'; plan.value_bytes];
            let op: Op = Arc::new(move |task, seq| {
                let etcd = clients[task % clients.len()].clone();
                let key = key_of(&format!("bench-w-{run}-{seq}"));
                let value = value.clone();
                Box::pin(async move { etcd.put(key, value).await.map(|_| 1) })
            });
            Some((op, "Put of a new key".to_string()))
        }
        Workload::BatchLookup | Workload::CheckAccess | Workload::Mixed | Workload::Import => None,
    }
}
