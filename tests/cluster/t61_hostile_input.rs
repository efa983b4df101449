//! Hostile input (the B-rows of reliability.md): oversized and malformed messages, invalid
//! UTF-8, control characters, bytes that are not gRPC, idle and half-open connections, a flood
//! from one identity. Each must leave every node running, the log where it was and the term
//! unchanged; a flood is shed with RESOURCE_EXHAUSTED while other callers are served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use rand::{Rng, SeedableRng};
use residency_client::pb;
use residency_proto::metadata;
use residency_tests::{Cluster, serially};
use residency_types::{Consistency, ReasonCode};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::DEFAULT_RAFT;

/// Sends and receives message bodies as raw bytes, so a test can send what no generated client
/// would encode.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

/// Sends `body` as the request message of `path` on node `id`; returns the status.
async fn send_raw(cluster: &Cluster, id: u64, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(cluster.raw_channel(id).await);
    grpc.ready().await.expect("ready");
    let result: Result<tonic::Response<Vec<u8>>, tonic::Status> = grpc
        .unary(
            tonic::Request::new(body),
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await;
    match result {
        Ok(response) => panic!("{path} accepted {:?}", response.into_inner()),
        Err(status) => status,
    }
}

/// Each node's last log index and term, and whether it answers.
async fn vitals(cluster: &Cluster) -> Vec<(Option<u64>, u64)> {
    let mut vitals = Vec::new();
    for node in cluster.nodes.values() {
        let status = cluster.member_status(node.id).await;
        vitals.push((status.last_log_index, status.term));
    }
    vitals
}

/// A protobuf length-delimited field.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

#[test]
fn malformed_bytes_and_oversized_messages_are_refused_without_harm() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let before = vitals(&cluster).await;
        const ASSIGN: &str = "/residency.v1.Registry/Assign";
        let context = field(5, &[field(1, b"req-1"), field(3, b"why")].concat());

        // Invalid UTF-8 in a string field (the user id), in an otherwise well-formed request.
        let body = [
            field(1, &[0xff, 0xfe, 0x41]),
            field(2, b"US"),
            field(3, b"us-east-1/pg-1"),
            context.clone(),
        ]
        .concat();
        let status = send_raw(&cluster, 1, ASSIGN, body).await;
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        // A length prefix that runs past the end of the message.
        let status = send_raw(&cluster, 2, ASSIGN, vec![0x0a, 0x7f, b'u']).await;
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        // A wire type that does not exist.
        let status = send_raw(&cluster, 3, ASSIGN, vec![0x0f, 0x01]).await;
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        // Random bytes, seeded, at every RPC that writes.
        let mut random = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for path in [
            ASSIGN,
            "/residency.v1.Registry/BatchAssign",
            "/residency.v1.Registry/Forget",
            "/residency.v1.Registry/BeginMove",
            "/residency.v1.Catalog/PutLocation",
            "/residency.v1.Catalog/PutPolicy",
        ] {
            for _ in 0..20 {
                let length = random.random_range(1..512);
                let body: Vec<u8> = (0..length).map(|_| random.random()).collect();
                let mut grpc = tonic::client::Grpc::new(cluster.raw_channel(1).await);
                grpc.ready().await.expect("ready");
                let answer: Result<tonic::Response<Vec<u8>>, tonic::Status> = grpc
                    .unary(
                        tonic::Request::new(body.clone()),
                        http::uri::PathAndQuery::from_static(path),
                        RawCodec,
                    )
                    .await;
                // Random bytes may decode as a message; it must then be refused by validation.
                let status = answer.expect_err("random bytes were accepted");
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Internal | tonic::Code::InvalidArgument
                    ),
                    "{path} {body:?}: {status:?}"
                );
            }
        }

        // Over the 4 MiB message limit: refused before decoding.
        let huge = [
            field(1, b"u1"),
            field(5, &field(3, &vec![b'a'; 5 * 1024 * 1024])),
        ]
        .concat();
        let status = send_raw(&cluster, 1, ASSIGN, huge).await;
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

        // Control characters and over-long ids, through the generated client.
        let mut raw = cluster.raw_registry(1).await;
        for user_id in [
            "u\u{0}1",
            "u\n1",
            "u\u{7f}1",
            "u\u{202e}1",
            &"u".repeat(129),
        ] {
            let request = pb::LookupRequest {
                user_id: user_id.to_string(),
                consistency: None,
            };
            let status = raw.lookup(request).await.expect_err("refused");
            assert_eq!(
                metadata::reason(&status),
                Some(ReasonCode::InvalidUserId),
                "{user_id:?}"
            );
        }
        // An unknown enum value in a write.
        let request = pb::SetLocationStateRequest {
            location_id: "us-east-1/pg-1".to_string(),
            state: 42,
            context: Some(pb::WriteContext {
                request_id: "req-enum".to_string(),
                caller: String::new(),
                reason: String::new(),
            }),
        };
        let mut catalog = pb::catalog_client::CatalogClient::new(cluster.raw_channel(1).await);
        let status = catalog
            .set_location_state(request)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

        assert_eq!(vitals(&cluster).await, before, "the log or the term moved");
    });
}

/// Writes `bytes` to `port` and waits for the node to close the connection; returns how long
/// that took.
fn closed_after(port: u16, bytes: &[u8], patience: Duration) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(patience))
        .expect("read timeout");
    stream.write_all(bytes).expect("write");
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                return started.elapsed();
            }
            Err(error) => panic!("port {port} kept the connection open: {error}"),
        }
    }
}

#[test]
fn bytes_that_are_not_grpc_and_idle_connections_are_dropped() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let before = vitals(&cluster).await;
        let node = &cluster.nodes[&1];
        let patience = Duration::from_secs(15);
        let mut random = rand::rngs::StdRng::seed_from_u64(7);
        let noise: Vec<u8> = (0..4096).map(|_| random.random()).collect();
        let http1 = b"GET / HTTP/1.1\r\nHost: registry\r\n\r\n".to_vec();
        let h2_plaintext = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for port in [node.client_port, node.peer_port] {
            for bytes in [&noise, &http1, &h2_plaintext] {
                closed_after(port, bytes, patience);
            }
        }

        // Idle connections (TCP open, nothing sent): they do not keep others out, and the TLS
        // handshake deadline (5 s) closes them.
        let idle: Vec<TcpStream> = (0..64)
            .map(|_| TcpStream::connect(("127.0.0.1", node.client_port)).expect("connect"))
            .collect();
        let client = cluster.client_for(1);
        client
            .status()
            .await
            .expect("served while idle connections wait");
        client
            .lookup(&crate::user("nobody"), Consistency::Linearizable)
            .await
            .expect("served");
        for mut stream in idle {
            stream
                .set_read_timeout(Some(patience))
                .expect("read timeout");
            let mut sink = [0u8; 16];
            match stream.read(&mut sink) {
                Ok(0) => {}
                Ok(_) => panic!("the node sent bytes to a silent connection"),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(error) => panic!("an idle connection stayed open: {error}"),
            }
        }
        // A half-open TLS handshake: a ClientHello's first bytes, then silence.
        let took = closed_after(
            node.client_port,
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
            patience,
        );
        assert!(took < patience, "a half-sent handshake lingered");

        assert_eq!(vitals(&cluster).await, before, "the log or the term moved");
    });
}

/// Looks up `user_id` (placed by nobody): true if served (`USER_NOT_FOUND` is an answer), false
/// if shed with `RESOURCE_EXHAUSTED` and `shed`. Anything else fails the test.
async fn served_or_shed(
    raw: &mut pb::registry_client::RegistryClient<tonic::transport::Channel>,
    user_id: &str,
    shed: ReasonCode,
) -> bool {
    let request = pb::LookupRequest {
        user_id: user_id.to_string(),
        consistency: None,
    };
    match raw.lookup(request).await {
        Ok(_) => true,
        Err(status) => match metadata::reason(&status) {
            Some(ReasonCode::UserNotFound) => true,
            Some(reason) if reason == shed => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                false
            }
            other => panic!("unexpected {other:?}: {status:?}"),
        },
    }
}

#[test]
fn a_flood_from_one_identity_is_shed_and_others_are_served() {
    serially(|| async {
        // A low rate for one caller, so the flood is easy to make on two cores.
        let raft = format!(
            "{DEFAULT_RAFT}\n\n[limits]\ncaller_requests_per_second = 100\ncaller_requests_burst = 100"
        );
        let cluster = Cluster::start(3, &raft).await;
        let leader = cluster.wait_for_leader(None).await;
        let before = vitals(&cluster).await;
        let channel = cluster.raw_channel_as(leader, "service-reader").await;
        let flood_for = Duration::from_secs(3);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let mut raw = pb::registry_client::RegistryClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                let (mut served, mut limited) = (0u64, 0u64);
                let started = Instant::now();
                while started.elapsed() < flood_for {
                    if served_or_shed(&mut raw, "flood", ReasonCode::RateLimited).await {
                        served += 1;
                    } else {
                        limited += 1;
                    }
                }
                (served, limited)
            }));
        }
        // Meanwhile another identity is served as usual.
        let writer = cluster.client_as("service-writer");
        for n in 0..10 {
            writer
                .lookup(
                    &crate::user(&format!("bystander-{n}")),
                    Consistency::Linearizable,
                )
                .await
                .expect("another caller is served during the flood");
        }
        let (mut served, mut limited) = (0, 0);
        for task in tasks {
            let (s, l) = task.await.expect("flood task");
            served += s;
            limited += l;
        }
        assert!(limited > 0, "nothing was shed ({served} served)");
        // The burst, the rate over the flood, and slack for the end of the window.
        let allowed = 100 + 100 * (flood_for.as_secs() + 2);
        assert!(
            served <= allowed,
            "{served} served, more than the rate allows ({allowed})"
        );
        let (_, body) = cluster.http_get(leader, "/metrics");
        assert!(
            body.contains("residency_requests_refused_total{reason=\"RATE_LIMITED\"}"),
            "{body}"
        );
        assert_eq!(
            vitals(&cluster).await,
            before,
            "the flood moved the log or the term"
        );
    });
}

#[test]
fn overload_is_answered_resource_exhausted_and_causes_no_election() {
    serially(|| async {
        // Eight requests in flight per node, two per caller: 64 concurrent reads from one
        // caller overload it, while another caller still finds room.
        let raft = format!(
            "{DEFAULT_RAFT}\n\n[limits]\nrequests_in_flight_max = 8\ncaller_requests_in_flight_max = 2"
        );
        let cluster = Cluster::start(3, &raft).await;
        let leader = cluster.wait_for_leader(None).await;
        let before = vitals(&cluster).await;
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let mut raw =
                pb::registry_client::RegistryClient::new(cluster.raw_channel(leader).await);
            tasks.push(tokio::spawn(async move {
                let (mut served, mut shed) = (0u64, 0u64);
                for _ in 0..20 {
                    if served_or_shed(&mut raw, "overload", ReasonCode::Overloaded).await {
                        served += 1;
                    } else {
                        shed += 1;
                    }
                }
                (served, shed)
            }));
        }
        // Meanwhile another caller, one request at a time, is never shed.
        let mut reader = pb::registry_client::RegistryClient::new(
            cluster.raw_channel_as(leader, "service-reader").await,
        );
        for _ in 0..50 {
            let served = served_or_shed(&mut reader, "bystander", ReasonCode::Overloaded).await;
            assert!(served, "another caller was shed");
        }
        let (mut served, mut shed) = (0, 0);
        for task in tasks {
            let (s, l) = task.await.expect("task");
            served += s;
            shed += l;
        }
        assert!(shed > 0, "nothing was shed ({served} served)");
        assert!(served > 0, "nothing was served ({shed} shed)");
        // The typed client retries OVERLOADED after a pause, so a patient caller gets through.
        cluster
            .client_for(leader)
            .status()
            .await
            .expect("served after the overload");
        let (_, body) = cluster.http_get(leader, "/metrics");
        assert!(
            body.contains("residency_requests_refused_total{reason=\"OVERLOADED\"}"),
            "{body}"
        );
        assert_eq!(
            vitals(&cluster).await,
            before,
            "the overload moved the log or the term"
        );
    });
}
