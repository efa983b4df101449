//! Guards against openraft 0.9's repeated split vote: it draws one random election timeout per
//! process and reuses it, so two voters whose draws land on the same tick can split votes again
//! and again. When a voter has seen no leader for twice the longest election
//! timeout, it waits a fresh random delay and starts an election itself.

use std::time::{Duration, Instant};

use rand::Rng;
use residency_store::{NodeId, Raft};

pub async fn run(raft: Raft, node_id: NodeId, election_timeout_max: Duration) {
    let mut leaderless_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(election_timeout_max / 4).await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.running_state.is_err() {
            return;
        }
        let is_voter = metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == node_id);
        if metrics.current_leader.is_some() || !is_voter {
            leaderless_since = None;
            continue;
        }
        let since = *leaderless_since.get_or_insert_with(Instant::now);
        if since.elapsed() < election_timeout_max * 2 {
            continue;
        }
        let jitter_ms = rand::rng().random_range(0..=election_timeout_max.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(jitter_ms)).await;
        if raft.metrics().borrow().current_leader.is_none() {
            tracing::warn!(
                leaderless_ms = since.elapsed().as_millis() as u64,
                "no leader for too long; starting an election"
            );
            metrics::counter!("residency_watchdog_elections_total").increment(1);
            let _ = raft.trigger().elect().await;
        }
        leaderless_since = None;
    }
}
