//! `CachedChecker` on a real cluster: it converges to the registry's state after a burst of
//! writes (same digest, same decisions as the nodes), it denies with `CACHE_NOT_FRESH` once the
//! cluster is gone for longer than its staleness bound — never answering from state older than
//! the bound — and it answers again when the cluster returns.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use residency_client::cache::CacheState;
use residency_client::{CacheOptions, CachedChecker, Client};
use residency_tests::{Cluster, serially, us_location};
use residency_types::{
    AccessOperation, Consistency, Decision, DenyReason, Jurisdiction, LocationState, Revision,
};

use crate::{DEFAULT_RAFT, assign, location, user};

const STALENESS_BOUND: Duration = Duration::from_secs(2);
const CONVERGE_WAIT: Duration = Duration::from_secs(60);

fn checker_for(cluster: &Cluster) -> CachedChecker {
    CachedChecker::start(cluster.client(), CacheOptions::with_bound(STALENESS_BOUND))
}

/// Waits until the cache has every change up to `revision`.
async fn wait_cache_at(checker: &CachedChecker, revision: Revision) {
    let deadline = Instant::now() + CONVERGE_WAIT;
    while checker.freshness().revision < revision {
        assert!(
            Instant::now() < deadline,
            "the cache stayed at {:?}, short of {revision}",
            checker.freshness()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A burst of writes of every kind: assigns, moves begun, completed and aborted, forgets, a
/// location drained and a policy replaced. Returns the revision of the last.
async fn burst(client: &Client) -> Revision {
    for n in 0..120 {
        assign(client, &format!("burst-{n}"), us_location(n)).await;
    }
    for n in 0..20 {
        let user_id = user(&format!("burst-{n}"));
        let target = location(us_location(n + 1));
        client
            .begin_move(&user_id, &target, None)
            .await
            .expect("begin move");
        if n % 2 == 0 {
            client
                .complete_move(&user_id, None)
                .await
                .expect("complete");
        } else if n % 3 == 0 {
            client.abort_move(&user_id, None).await.expect("abort");
        }
    }
    for n in 100..110 {
        client
            .forget(&user(&format!("burst-{n}")), None)
            .await
            .expect("forget");
    }
    client
        .set_location_state(
            &location("us-central-1/pg-3"),
            LocationState::Draining,
            None,
        )
        .await
        .expect("drain");
    let us = BTreeSet::from([Jurisdiction::US]);
    client
        .put_policy(Jurisdiction::US, &us, &us, None)
        .await
        .expect("policy");
    client.highest_revision()
}

#[test]
fn the_cache_converges_to_the_registry_and_decides_as_the_nodes_do() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        for n in 0..30 {
            assign(&client, &format!("before-{n}"), us_location(n)).await;
        }
        let checker = checker_for(&cluster);
        checker
            .wait_fresh(CONVERGE_WAIT)
            .await
            .expect("the cache becomes fresh");
        let last = burst(&client).await;
        wait_cache_at(&checker, last).await;

        // The registry's state at that revision, listed from a fresh snapshot.
        let listing = client.list_state(false).await.expect("list state");
        assert_eq!(
            listing.revision, last,
            "nothing was written after the burst"
        );
        let (revision, digest, count) = checker.digest();
        assert_eq!(revision, last);
        assert_eq!(
            (digest, count),
            CacheState::from_listing(listing).digest(),
            "the cache differs from the registry"
        );

        // The same decisions as the nodes, for users moving, moved, forgotten and unknown.
        let us = Jurisdiction::US;
        let cn = Jurisdiction::parse("CN").expect("CN");
        for name in [
            "burst-0",
            "burst-1",
            "burst-3",
            "burst-100",
            "before-5",
            "nobody",
        ] {
            for (jurisdiction, operation) in [
                (us, AccessOperation::Read),
                (us, AccessOperation::Write),
                (cn, AccessOperation::Read),
            ] {
                let cached = checker.check_access(&user(name), jurisdiction, operation);
                let remote = client
                    .check_access(
                        &user(name),
                        "cache-test",
                        jurisdiction,
                        operation,
                        Consistency::AtLeast(cached.revision),
                    )
                    .await
                    .expect("check");
                assert_eq!(
                    cached.decision, remote.decision,
                    "{name} {jurisdiction} {operation:?}"
                );
            }
        }
        assert!(checker.stats().hits > 0);
    });
}

#[test]
fn the_cache_denies_past_its_bound_without_the_cluster_and_resumes_after() {
    serially(|| async {
        let mut cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let client = cluster.client();
        assign(&client, "steady", "us-east-1/pg-1").await;
        let checker = checker_for(&cluster);
        checker
            .wait_fresh(CONVERGE_WAIT)
            .await
            .expect("the cache becomes fresh");
        let steady = user("steady");
        assert!(matches!(
            checker
                .check_access(&steady, Jurisdiction::US, AccessOperation::Read)
                .decision,
            Decision::Allow { .. }
        ));

        // Every node frozen: the watch and the probes get no answer.
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        let cut = Instant::now();
        for id in &ids {
            cluster.node(*id).freeze();
        }
        let deadline = cut + STALENESS_BOUND + CONVERGE_WAIT;
        loop {
            let asked = Instant::now();
            let decision = checker
                .check_access(&steady, Jurisdiction::US, AccessOperation::Read)
                .decision;
            if decision
                == (Decision::Deny {
                    reason: DenyReason::CacheNotFresh,
                })
            {
                break;
            }
            // Nothing proven after the cut: an answer past the bound would be from old state.
            assert!(
                asked <= cut + STALENESS_BOUND,
                "the cache answered {decision:?} {:?} after the cluster froze (bound {:?})",
                asked - cut,
                STALENESS_BOUND
            );
            assert!(Instant::now() < deadline, "the cache never denied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!checker.freshness().fresh);
        assert!(checker.lookup(&steady).is_err(), "lookups refuse too");
        assert!(checker.stats().not_fresh > 0);

        // The cluster returns, with a write made while the cache was cut off; the cache catches
        // up, vouches for itself again and sees the write.
        for id in &ids {
            cluster.node(*id).thaw();
        }
        cluster.wait_for_leader(None).await;
        let moved = client
            .begin_move(&steady, &location("us-west-2/pg-2"), None)
            .await
            .expect("begin move");
        wait_cache_at(&checker, moved.revision).await;
        checker
            .wait_fresh(CONVERGE_WAIT)
            .await
            .expect("the cache is fresh again");
        assert_eq!(
            checker
                .check_access(&steady, Jurisdiction::US, AccessOperation::Write)
                .decision,
            Decision::Deny {
                reason: DenyReason::UserMoving
            }
        );
        let cached = checker
            .lookup(&steady)
            .expect("fresh")
            .expect("steady is placed");
        assert_eq!(cached.location_id, moved.placement.location_id);
        assert_eq!(
            cached.move_target.as_ref(),
            moved.placement.state.move_target()
        );
        assert_eq!(cached.epoch, moved.placement.epoch);
        assert_eq!(cached.mod_revision, moved.placement.mod_revision);
    });
}
