//! `residency.v1.Watch`: the change history from a revision on, then live, with progress
//! notices. Every replica holds the same history (events are written by apply, atomically with
//! the state), so any node serves a watch and a watcher resumes on another after a failure.
//! Memory per watcher is bounded: a watcher that does not keep up is cut off.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::Stream;
use residency_proto::pb::watch_server::Watch;
use residency_proto::pb::{
    ListStateRequest, WatchProgress, WatchRequest, WatchResponse, watch_response,
};
use residency_types::{Event, LocationId, ReasonCode, Revision};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::node::Node;

/// Messages buffered for one watcher, at most.
const WATCH_BUFFER_MESSAGES: usize = 256;
/// How long a send may wait for a watcher to read before the watcher is cut off.
const WATCH_SEND_WAIT_MS: u64 = 5_000;
/// How long a quiet watch waits before it sends a progress notice, unless the watcher asks for
/// another interval within the bounds.
const WATCH_PROGRESS_INTERVAL_MS_DEFAULT: u32 = 1_000;
const WATCH_PROGRESS_INTERVAL_MS_MIN: u32 = 100;
const WATCH_PROGRESS_INTERVAL_MS_MAX: u32 = 60_000;
/// Events read from the state per page.
const WATCH_PAGE_EVENTS: usize = 1_000;
/// Watches one node serves at once; more are refused with RESOURCE_EXHAUSTED.
const WATCHERS_MAX: usize = 1_024;
/// A user-id prefix is at most a user id.
const USER_ID_PREFIX_BYTES_MAX: usize = residency_types::limits::USER_ID_BYTES_MAX;

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[derive(Debug)]
pub struct WatchService {
    node: Arc<Node>,
    watchers: Arc<AtomicUsize>,
}

impl WatchService {
    pub fn new(node: Arc<Node>) -> WatchService {
        WatchService {
            node,
            watchers: Arc::default(),
        }
    }
}

/// What a watch asked for.
#[derive(Debug, Clone)]
struct Filter {
    user_id_prefix: String,
    location_id: Option<LocationId>,
    progress_interval: Duration,
}

impl Filter {
    fn matches(&self, event: &Event) -> bool {
        if !self.user_id_prefix.is_empty() {
            let Some(user_id) = event.user_id() else {
                return false;
            };
            if !user_id.as_str().starts_with(&self.user_id_prefix) {
                return false;
            }
        }
        self.location_id
            .as_ref()
            .is_none_or(|location_id| event.concerns_location(location_id))
    }
}

/// Releases a watcher slot when the watch ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn message(kind: watch_response::Kind) -> WatchResponse {
    WatchResponse { kind: Some(kind) }
}

/// Where a watch's messages go: a bounded queue of messages, and apart from it the error that
/// ends the watch, which the stream delivers as soon as it is polled, ahead of whatever is still
/// queued (a watcher cut off for being slow must learn why, not see a clean end).
struct Outbox {
    messages: mpsc::Sender<WatchResponse>,
    end: Option<oneshot::Sender<Status>>,
}

impl Outbox {
    /// Sends one message, waiting a bounded time for the watcher to read. `false`: the watch
    /// ends (the watcher is gone, or was cut off).
    async fn send(&mut self, item: WatchResponse) -> bool {
        let wait = Duration::from_millis(WATCH_SEND_WAIT_MS);
        match tokio::time::timeout(wait, self.messages.send(item)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                metrics::counter!("residency_watchers_cut_off_total").increment(1);
                self.fail(ApiError::WatcherTooSlow.into());
                false
            }
        }
    }

    /// Ends the watch with `status`.
    fn fail(&mut self, status: Status) {
        if let Some(end) = self.end.take() {
            let _ = end.send(status);
        }
    }
}

/// The stream of one watch: the ending error first whenever there is one, else the queue.
fn watch_stream(
    messages: mpsc::Receiver<WatchResponse>,
    end: oneshot::Receiver<Status>,
) -> WatchStream {
    struct State {
        messages: mpsc::Receiver<WatchResponse>,
        end: Option<oneshot::Receiver<Status>>,
        ended: bool,
    }
    let state = State {
        messages,
        end: Some(end),
        ended: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        if state.ended {
            return None;
        }
        loop {
            let Some(end) = state.end.as_mut() else {
                let item = state.messages.recv().await?;
                return Some((Ok(item), state));
            };
            tokio::select! {
                biased;
                ending = end => match ending {
                    Ok(status) => {
                        state.ended = true;
                        return Some((Err(status), state));
                    }
                    // The watch ended without an error: deliver what is queued, then end.
                    Err(_) => state.end = None,
                },
                item = state.messages.recv() => return item.map(|item| (Ok(item), state)),
            }
        }
    }))
}

/// Whether events a watcher still needs are gone: those of `next` on, or, part way through a
/// revision's events (`after`), the rest of that revision's. Once the history's bounds drop a
/// revision the watcher is in, a page read after it would skip to later revisions: a gap.
fn history_lost(
    next: u64,
    after: Option<residency_core::query::EventCursor>,
    compacted: Revision,
) -> bool {
    let needed = after.map_or(next, |(revision, _)| revision.0);
    needed <= compacted.0
}

/// Streams events from `next` on until the watcher goes or falls behind the history.
async fn run(node: Arc<Node>, mut next: u64, filter: Filter, mut outbox: Outbox, _slot: Slot) {
    let mut applied = node.reader.subscribe_applied();
    let mut after: Option<residency_core::query::EventCursor> = None;
    loop {
        // Catch up with everything applied so far, a page at a time.
        let mut sent_events = false;
        loop {
            let read = node
                .reader
                .query(|view| {
                    Ok((
                        residency_core::query::events(
                            view,
                            Revision(next),
                            after,
                            WATCH_PAGE_EVENTS,
                        )?,
                        residency_core::query::history_floor(view)?,
                    ))
                })
                .await;
            let ((page, floor), at) = match read {
                Ok(read) => read,
                Err(error) => {
                    outbox.fail(ApiError::internal(error).into());
                    return;
                }
            };
            let compacted = residency_core::query::compacted_revision(at, floor);
            if history_lost(next, after, compacted) {
                // The history moved past this watcher while it read.
                outbox.fail(ApiError::WatchCompacted { compacted }.into());
                return;
            }
            let full = page.len() == WATCH_PAGE_EVENTS;
            for event in page {
                after = Some((event.revision, event.index));
                if !filter.matches(&event) {
                    continue;
                }
                let item = message(watch_response::Kind::Event((&event).into()));
                if !outbox.send(item).await {
                    return;
                }
                sent_events = true;
            }
            if !full {
                // Never back: a watch may start past what this node has applied (a token from
                // a node further ahead), and must not deliver the events before its start.
                next = next.max(at.0 + 1);
                after = None;
                break;
            }
        }
        // Mark the end of what was caught up with: the watcher then knows every change up to
        // here has arrived (the events of one revision may be several) without waiting for the
        // idle notice.
        if sent_events {
            let progress = WatchProgress { revision: next - 1 };
            if !outbox
                .send(message(watch_response::Kind::Progress(progress)))
                .await
            {
                return;
            }
        }
        // Wait for the next apply, or tell an idle watcher how fresh it is.
        match tokio::time::timeout(filter.progress_interval, applied.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                let progress = WatchProgress {
                    revision: next.saturating_sub(1),
                };
                if !outbox
                    .send(message(watch_response::Kind::Progress(progress)))
                    .await
                {
                    return;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let request = request.into_inner();
        let prefix_ok = request.user_id_prefix.len() <= USER_ID_PREFIX_BYTES_MAX
            && request
                .user_id_prefix
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"._:@-".contains(&byte));
        if !prefix_ok {
            return Err(ApiError::invalid(
                ReasonCode::InvalidUserId,
                "user_id_prefix",
                "is not the start of a user id",
            )
            .into());
        }
        let location_id = match request.location_id.as_str() {
            "" => None,
            location => Some(LocationId::parse(location).map_err(ApiError::from)?),
        };
        let progress_interval_ms = match request.progress_interval_ms {
            0 => WATCH_PROGRESS_INTERVAL_MS_DEFAULT,
            ms if (WATCH_PROGRESS_INTERVAL_MS_MIN..=WATCH_PROGRESS_INTERVAL_MS_MAX)
                .contains(&ms) =>
            {
                ms
            }
            ms => {
                return Err(ApiError::invalid(
                    ReasonCode::InvalidArgument,
                    "progress_interval_ms",
                    format!(
                        "is {ms}; give 0 (the default) or {WATCH_PROGRESS_INTERVAL_MS_MIN} to \
                         {WATCH_PROGRESS_INTERVAL_MS_MAX}"
                    ),
                )
                .into());
            }
        };
        let (floor, applied) = self
            .node
            .reader
            .query(|view| Ok(residency_core::query::history_floor(view)?))
            .await
            .map_err(ApiError::internal)?;
        let from = if request.from_revision == 0 {
            applied.0 + 1
        } else {
            request.from_revision
        };
        let compacted = residency_core::query::compacted_revision(applied, floor);
        if from <= compacted.0 {
            return Err(ApiError::WatchCompacted { compacted }.into());
        }
        if self.watchers.fetch_add(1, Ordering::SeqCst) >= WATCHERS_MAX {
            self.watchers.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Overloaded(format!(
                "this node already serves {WATCHERS_MAX} watches"
            ))
            .into());
        }
        let slot = Slot(self.watchers.clone());
        metrics::gauge!("residency_watchers").set(self.watchers.load(Ordering::SeqCst) as f64);
        let filter = Filter {
            user_id_prefix: request.user_id_prefix,
            location_id,
            progress_interval: Duration::from_millis(u64::from(progress_interval_ms)),
        };
        let (messages, queued) = mpsc::channel(WATCH_BUFFER_MESSAGES);
        let (end, ending) = oneshot::channel();
        let outbox = Outbox {
            messages,
            end: Some(end),
        };
        tokio::spawn(run(self.node.clone(), from, filter, outbox, slot));
        Ok(Response::new(watch_stream(queued, ending)))
    }

    type ListStateStream = crate::backup::ListStateStream;

    async fn list_state(
        &self,
        request: Request<ListStateRequest>,
    ) -> Result<Response<Self::ListStateStream>, Status> {
        let request = request.into_inner();
        let stream = self
            .node
            .list_state(request.allow_recent_snapshot)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;

    #[test]
    fn a_watcher_part_way_through_a_dropped_revision_has_lost_events() {
        let compacted = Revision(10);
        assert!(
            history_lost(10, None, compacted),
            "it starts at a dropped revision"
        );
        assert!(!history_lost(11, None, compacted));
        assert!(
            history_lost(11, Some((Revision(10), 3)), compacted),
            "part way through revision 10, whose rest is gone"
        );
        assert!(!history_lost(11, Some((Revision(11), 3)), compacted));
    }
}
