//! Mutual TLS, identities and roles, the audit file: who may call what, with exact outcomes,
//! and nothing changed by any refusal.

use std::path::Path;
use std::time::Duration;

use residency_client::{Client, ClientError, ClientOptions, TlsOptions, WriteOptions, pb};
use residency_proto::peer_pb;
use residency_tests::{Cluster, serially};
use residency_types::{AccessOperation, Consistency, Jurisdiction, Labels, LocationId, ReasonCode};

use crate::{DEFAULT_RAFT, user};

/// The deadline of a call expected to fail at the handshake (the client retries transport
/// errors until then).
const REFUSED_CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|error| panic!("{name}: {error}"))
}

/// A client of every node that trusts the cluster's CA and presents `identity`, if any.
fn client_with(cluster: &Cluster, identity: Option<(Vec<u8>, Vec<u8>)>) -> Client {
    let certs = cluster.security.certs().expect("tls");
    let options = ClientOptions {
        timeout: REFUSED_CALL_TIMEOUT,
        caller: "claimed-name".to_string(),
        tls: Some(TlsOptions {
            ca_pem: read(certs, "ca.pem"),
            identity,
        }),
    };
    let endpoints = cluster
        .nodes
        .values()
        .map(|node| node.client_addr())
        .collect();
    Client::new(endpoints, options).expect("client")
}

/// Where the state stands: the digest of every node and the term.
async fn fingerprint(cluster: &Cluster) -> (Vec<String>, u64) {
    let client = cluster.client();
    let status = client.status().await.expect("status");
    // Every node at the furthest revision first: one still applying the cluster's setup would
    // show a change where there was none.
    let applied = status
        .members
        .iter()
        .filter_map(|member| member.applied_index)
        .max()
        .unwrap_or(0);
    for node in cluster.nodes.values().filter(|node| node.is_running()) {
        cluster.wait_applied(node.id, applied).await;
    }
    let mut digests = Vec::new();
    for node in cluster.nodes.values().filter(|node| node.is_running()) {
        let digest = cluster.client_for(node.id).digest().await.expect("digest");
        digests.push(format!("{}@{}", digest.sha256_hex, digest.revision));
    }
    (digests, status.term)
}

/// The outcome of one call, as the matrix names it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The call reached the service (whatever the service then answered).
    Served,
    Denied,
    Unauthenticated,
    /// No TLS session: the handshake refused the certificate, or its absence.
    NoConnection,
}

fn outcome<T>(result: Result<T, ClientError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Served,
        // No reason code: the call never reached a service.
        Err(ClientError::Status {
            reason: None,
            code: tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled,
            ..
        }) => Outcome::NoConnection,
        Err(error) => match error.reason() {
            Some(ReasonCode::PermissionDenied) => Outcome::Denied,
            Some(ReasonCode::Unauthenticated) => Outcome::Unauthenticated,
            Some(_) => Outcome::Served,
            None => panic!("unexpected {error}"),
        },
    }
}

/// One call of each class of RPC, each with an argument no other call uses; returns the
/// outcomes in the order read, check, write, catalog, membership.
async fn every_class(client: &Client, tag: &str) -> Vec<Outcome> {
    let read = client
        .lookup(&user("matrix-known"), Consistency::Linearizable)
        .await;
    let check = client
        .check_access(
            &user("matrix-known"),
            "payments",
            Jurisdiction::US,
            AccessOperation::Read,
            Consistency::Linearizable,
        )
        .await;
    let write = client
        .assign(
            &user(&format!("matrix-{tag}")),
            Jurisdiction::US,
            &LocationId::parse("us-east-1/pg-1").expect("location"),
            Some(WriteOptions {
                reason: "matrix".to_string(),
                ..WriteOptions::default()
            }),
        )
        .await;
    let catalog = client
        .put_location(
            &LocationId::parse(format!("us-east-1/matrix-{tag}")).expect("location"),
            Jurisdiction::US,
            &Labels::default(),
            None,
        )
        .await;
    // Node 99 is no member: an admin is told MEMBER_NOT_FOUND, which still counts as served.
    let membership = client.remove_member(99).await;
    vec![
        outcome(read),
        outcome(check),
        outcome(write),
        outcome(catalog),
        outcome(membership),
    ]
}

#[test]
fn each_identity_gets_exactly_what_its_role_allows_and_refusals_change_nothing() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let certs = cluster.security.certs().expect("tls").to_path_buf();
        let admin = cluster.client();
        admin
            .assign(
                &user("matrix-known"),
                Jurisdiction::US,
                &LocationId::parse("us-east-1/pg-1").expect("location"),
                None,
            )
            .await
            .expect("assign");
        use Outcome::{Denied, NoConnection, Served};

        // Refused before any service runs: the state and the term do not move.
        let before = fingerprint(&cluster).await;
        let stranger = client_with(
            &cluster,
            Some((
                read(&certs, "service-stranger.pem"),
                read(&certs, "service-stranger.key"),
            )),
        );
        assert_eq!(every_class(&stranger, "stranger").await, vec![Denied; 5]);
        let anonymous = client_with(&cluster, None);
        assert_eq!(
            every_class(&anonymous, "anonymous").await,
            vec![NoConnection; 5],
            "no certificate: the handshake fails"
        );
        let reader = cluster.client_as("service-reader");
        assert_eq!(
            every_class(&reader, "reader").await,
            vec![Served, Served, Denied, Denied, Denied]
        );
        let after = fingerprint(&cluster).await;
        assert_eq!(
            after, before,
            "a refused call changed the state or the term"
        );

        // Allowed calls do change it.
        let writer = cluster.client_as("service-writer");
        assert_eq!(
            every_class(&writer, "writer").await,
            vec![Served, Served, Served, Denied, Denied]
        );
        assert_eq!(every_class(&admin, "admin").await, vec![Served; 5]);

        // The identity recorded with a write is the certificate's, whatever the request says.
        let written = admin
            .lookup(&user("matrix-writer"), Consistency::Linearizable)
            .await
            .expect("lookup")
            .placement
            .expect("placed");
        assert_eq!(
            written.updated_by.as_str(),
            "spiffe://residency.local/service/writer"
        );
        assert!(written.updated_by_authenticated);

        // Every refusal above, and the admin's changes, are in the audit files, chained.
        let mut audit = String::new();
        for node in cluster.nodes.values() {
            let path = node.data_dir.join("audit.jsonl");
            let (code, out, err) = cluster.ctl(&["audit", "verify", path.to_str().expect("path")]);
            assert_eq!(code, Some(0), "{out}{err}");
            audit.push_str(&std::fs::read_to_string(&path).expect("audit file"));
        }
        assert!(audit.contains("\"identity\":\"spiffe://residency.local/service/stranger\""));
        assert!(audit.contains("\"outcome\":\"PERMISSION_DENIED\""));
        assert!(audit.contains("\"action\":\"/residency.v1.Catalog/PutLocation\""));
        assert!(audit.contains("us-east-1/matrix-admin"));
    });
}

/// A certificate from the CA, for `uris`, valid from `not_before` to `not_after` (seconds
/// relative to now).
fn issue(certs: &Path, uris: &[&str], not_before: i64, not_after: i64) -> (Vec<u8>, Vec<u8>) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).expect("ca key"))
            .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(certs.join("ca.pem")).expect("ca"),
        ca_key,
    )
    .expect("issuer");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    for uri in uris {
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(*uri).expect("uri"),
        ));
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(not_before);
    params.not_after = now + time::Duration::seconds(not_after);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

#[test]
fn certificates_the_cluster_must_not_accept_get_no_connection() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let certs = cluster.security.certs().expect("tls").to_path_buf();
        let before = fingerprint(&cluster).await;

        // Another CA's operator: unknown issuer.
        let other = tempfile::tempdir().expect("dir");
        let (code, _, err) = cluster.ctl(&[
            "certs",
            "init",
            "--dir",
            other.path().to_str().expect("path"),
        ]);
        assert_eq!(code, Some(0), "{err}");
        let foreign = client_with(
            &cluster,
            Some((
                read(other.path(), "operator.pem"),
                read(other.path(), "operator.key"),
            )),
        );
        assert_eq!(
            every_class(&foreign, "foreign").await,
            vec![Outcome::NoConnection; 5]
        );

        // An operator certificate from the right CA that expired an hour ago.
        let expired = client_with(
            &cluster,
            Some(issue(
                &certs,
                &["spiffe://residency.local/operator/expired"],
                -7_200,
                -3_600,
            )),
        );
        assert_eq!(
            every_class(&expired, "expired").await,
            vec![Outcome::NoConnection; 5]
        );
        // The same identity, valid: served, so the refusal above was the expiry.
        let fresh = client_with(
            &cluster,
            Some(issue(
                &certs,
                &["spiffe://residency.local/operator/expired"],
                -60,
                3_600,
            )),
        );
        assert_eq!(outcome(fresh.status().await), Outcome::Served);
        // A certificate whose URI is no identity of ours: refused by role, not served.
        let malformed = client_with(
            &cluster,
            Some(issue(
                &certs,
                &["spiffe://residency.local/robot/r2"],
                -60,
                3_600,
            )),
        );
        assert_eq!(outcome(malformed.status().await), Outcome::Denied);
        assert_eq!(fingerprint(&cluster).await, before);
    });
}

/// A raw client of node 1's peer port presenting `identity`.
async fn peer_client(
    cluster: &Cluster,
    identity: (Vec<u8>, Vec<u8>),
) -> Result<peer_pb::peer_client::PeerClient<tonic::transport::Channel>, tonic::transport::Error> {
    let certs = cluster.security.certs().expect("tls");
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://{}",
        cluster.nodes[&1].peer_addr()
    ))?
    .tls_config(
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(
                certs, "ca.pem",
            )))
            .identity(tonic::transport::Identity::from_pem(identity.0, identity.1)),
    )?
    .connect()
    .await?;
    Ok(peer_pb::peer_client::PeerClient::new(channel))
}

fn peer_refusal(result: Result<tonic::Response<pb::MemberStatus>, tonic::Status>) -> String {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    residency_proto::metadata::reason(&status)
        .map(|reason| reason.as_str().to_string())
        .unwrap_or_default()
}

#[test]
fn only_nodes_of_the_cluster_jurisdiction_talk_on_the_peer_port() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let certs = cluster.security.certs().expect("tls").to_path_buf();
        let before = fingerprint(&cluster).await;

        // A service certificate on the peer port.
        let mut service = peer_client(
            &cluster,
            (
                read(&certs, "service-writer.pem"),
                read(&certs, "service-writer.key"),
            ),
        )
        .await
        .expect("the TLS session itself is allowed");
        let refusal = peer_refusal(service.local_status(peer_pb::LocalStatusRequest {}).await);
        assert_eq!(refusal, "PEER_NOT_ALLOWED");

        // A node certificate for Canada, from the cluster's own CA.
        let outsider = cluster.configure_node("CA", "CA", DEFAULT_RAFT);
        let mut canadian = peer_client(
            &cluster,
            (
                read(&certs, &format!("node{outsider}.pem")),
                read(&certs, &format!("node{outsider}.key")),
            ),
        )
        .await
        .expect("session");
        let refusal = peer_refusal(canadian.local_status(peer_pb::LocalStatusRequest {}).await);
        assert_eq!(refusal, "PEER_NOT_ALLOWED");
        // That node cannot start either: this cluster admits US nodes only.
        let log = cluster.start_expecting_exit(outsider).await;
        assert!(log.contains("may not join this cluster"), "{log}");

        // A node whose certificate says CA while its config says US does not start.
        let liar = cluster.configure_node("US", "CA", DEFAULT_RAFT);
        let log = cluster.start_expecting_exit(liar).await;
        assert!(log.contains("subject country"), "{log}");

        // A peer's node certificate works: LocalStatus answers.
        let mut node2 = peer_client(
            &cluster,
            (read(&certs, "node2.pem"), read(&certs, "node2.key")),
        )
        .await
        .expect("session");
        node2
            .local_status(peer_pb::LocalStatusRequest {})
            .await
            .expect("a node may ask");
        assert_eq!(fingerprint(&cluster).await, before);
    });
}

#[test]
fn the_audit_file_shows_an_edit_a_deletion_and_a_swap() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let stranger = cluster.client_as("service-stranger");
        for n in 0..4 {
            let _ = stranger
                .lookup(&user(&format!("audited-{n}")), Consistency::Stale)
                .await;
        }
        let source = cluster.nodes.values().find_map(|node| {
            let path = node.data_dir.join("audit.jsonl");
            let text = std::fs::read_to_string(&path).ok()?;
            (text.lines().count() >= 4).then_some(text)
        });
        let text = source.expect("a node recorded at least four records");
        let lines: Vec<&str> = text.lines().collect();
        let dir = tempfile::tempdir().expect("dir");
        let verify = |name: &str, lines: Vec<String>| {
            let path = dir.path().join(name);
            std::fs::write(&path, lines.concat()).expect("write");
            cluster.ctl(&["audit", "verify", path.to_str().expect("path")])
        };
        let as_lines = |lines: &[&str]| -> Vec<String> {
            lines.iter().map(|line| format!("{line}\n")).collect()
        };
        let (code, out, err) = verify("intact", as_lines(&lines));
        assert_eq!(code, Some(0), "{out}{err}");

        let mut edited = as_lines(&lines);
        edited[1] = edited[1].replacen("\"at_ms\":1", "\"at_ms\":2", 1);
        assert_ne!(
            edited[1],
            format!("{}\n", lines[1]),
            "the edit changed nothing"
        );
        let (code, out, _) = verify("edited", edited);
        assert_eq!(code, Some(1));
        assert!(out.contains("line 2") && out.contains("edited"), "{out}");

        let mut deleted = as_lines(&lines);
        deleted.remove(2);
        let (code, out, _) = verify("deleted", deleted);
        assert_eq!(code, Some(1));
        assert!(out.contains("line 3") && out.contains("removed"), "{out}");

        let mut swapped = as_lines(&lines);
        swapped.swap(1, 2);
        let (code, out, _) = verify("swapped", swapped);
        assert_eq!(code, Some(1));
        assert!(out.contains("line 2") && out.contains("line 3"), "{out}");

        let (code, out, err) = cluster.ctl(&[
            "audit",
            "tail",
            dir.path().join("intact").to_str().expect("path"),
            "-n",
            "2",
        ]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out.lines().count(), 2, "{out}");
    });
}

#[test]
fn no_user_id_or_location_reaches_a_log_line_or_a_metric_label() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let admin = cluster.client();
        let secret_location = LocationId::parse("us-west-2/secret-loc-9b2c").expect("location");
        admin
            .put_location(&secret_location, Jurisdiction::US, &Labels::default(), None)
            .await
            .expect("location");
        let secret_user = user("secret-user-7f3a");
        admin
            .assign(&secret_user, Jurisdiction::US, &secret_location, None)
            .await
            .expect("assign");
        // Reads, an allowed and a denied check, a refused write, a move, a failover, a forget.
        admin
            .lookup(&secret_user, Consistency::Linearizable)
            .await
            .expect("lookup");
        for jurisdiction in [Jurisdiction::US, Jurisdiction::parse("CN").expect("CN")] {
            admin
                .check_access(
                    &secret_user,
                    "payments",
                    jurisdiction,
                    AccessOperation::Read,
                    Consistency::Linearizable,
                )
                .await
                .expect("check");
        }
        let refused = admin
            .assign(
                &user("secret-user-8e4d"),
                Jurisdiction::US,
                &LocationId::parse("eu-central-1/pg-9").expect("location"),
                None,
            )
            .await;
        assert!(refused.is_err());
        let _ = cluster
            .client_as("service-stranger")
            .lookup(&user("secret-user-9c5e"), Consistency::Stale)
            .await;
        admin
            .begin_move(
                &secret_user,
                &LocationId::parse("us-east-1/pg-1").expect("location"),
                None,
            )
            .await
            .expect("begin move");
        let leader = cluster.wait_for_leader(None).await;
        cluster.node(leader).kill();
        cluster.wait_for_leader(Some(leader)).await;
        cluster.restart(leader);
        cluster.wait_serving(leader).await;
        admin
            .complete_move(&secret_user, None)
            .await
            .expect("complete move");
        admin.forget(&secret_user, None).await.expect("forget");

        let secrets = ["secret-user", "secret-loc"];
        let logs = cluster.logs();
        for line in logs.lines() {
            for secret in secrets {
                assert!(!line.contains(secret), "a log line holds {secret}: {line}");
            }
        }
        for node in cluster.nodes.values().filter(|node| node.is_running()) {
            let (_, metrics) = cluster.http_get(node.id, "/metrics");
            assert!(
                metrics.contains("residency_rpc_requests_total"),
                "{metrics}"
            );
            for secret in secrets {
                assert!(
                    !metrics.contains(secret),
                    "/metrics of node {} holds {secret}",
                    node.id
                );
            }
        }
        // The scan could have seen them: the audit files hold the denied check and the
        // catalog change, by name.
        let audit: String = cluster
            .nodes
            .values()
            .map(|node| {
                std::fs::read_to_string(node.data_dir.join("audit.jsonl")).unwrap_or_default()
            })
            .collect();
        assert!(audit.contains("secret-user-7f3a") && audit.contains("secret-loc-9b2c"));
    });
}

#[test]
fn with_client_certificates_optional_a_caller_without_one_gets_the_anonymous_role_or_nothing() {
    serially(|| async {
        use Outcome::{Denied, Served, Unauthenticated};
        {
            let cluster = Cluster::start_with(
                3,
                DEFAULT_RAFT,
                "client_certificates = \"optional\"",
                "anonymous_role = \"reader\"",
            )
            .await;
            let before = fingerprint(&cluster).await;
            let anonymous = client_with(&cluster, None);
            assert_eq!(
                every_class(&anonymous, "anonymous-reader").await,
                vec![Served, Served, Denied, Denied, Denied]
            );
            // A certificate without a role does not fall back to the anonymous role.
            let stranger = cluster.client_as("service-stranger");
            assert_eq!(every_class(&stranger, "stranger").await, vec![Denied; 5]);
            assert_eq!(fingerprint(&cluster).await, before);
        }
        let cluster =
            Cluster::start_with(3, DEFAULT_RAFT, "client_certificates = \"optional\"", "").await;
        let before = fingerprint(&cluster).await;
        let anonymous = client_with(&cluster, None);
        assert_eq!(
            every_class(&anonymous, "anonymous").await,
            vec![Unauthenticated; 5]
        );
        // Health answers anyone who connects.
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            cluster.raw_channel_as(1, "service-stranger").await,
        );
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health is open");
        assert_eq!(fingerprint(&cluster).await, before);
    });
}
