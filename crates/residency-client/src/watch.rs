//! Following changes: a watcher that resumes on another node when its node fails, without
//! skipping or repeating an event.

use residency_proto::pb;
use residency_proto::pb::watch_client::WatchClient;
use residency_types::{
    Consistency, Event, Location, LocationId, Placement, Policy, ReasonCode, Revision,
};
use tonic::Streaming;

use crate::{Client, ClientError, Route};

/// Reconnection attempts in a row before the watcher gives up.
const RECONNECT_ATTEMPTS_MAX: usize = 10;
const RECONNECT_PAUSE_MS: u64 = 300;
/// The node's progress interval when the watch does not ask for one.
const PROGRESS_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Progress intervals a watch may go without any message before the watcher takes its node
/// for lost (frozen, or cut off without the connection closing) and resumes on another.
const SILENT_PROGRESS_INTERVALS_MAX: u32 = 3;
/// Added to that, for the time a message takes to arrive.
const SILENCE_SLACK_MS: u64 = 1_000;

/// What a watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    Event(Event),
    /// Everything the watch asked for up to this revision has been delivered.
    Progress(Revision),
}

/// A live watch. `next` yields events in (revision, index) order, each once, across node
/// failures; `WATCH_COMPACTED` (re-list, then watch again) and other refusals end it. Started
/// from `Revision(0)`, it resumes gap-free only once it has seen an event or a progress notice;
/// give an explicit revision to be gap-free from the first moment.
#[derive(Debug)]
pub struct Watcher<'a> {
    client: &'a Client,
    request: pb::WatchRequest,
    stream: Option<Streaming<pb::WatchResponse>>,
    endpoint: usize,
    /// The last event delivered: a resumed stream starts at its revision and skips up to it.
    last: Option<(u64, u32)>,
    /// The newest progress notice: with no event since, a resumed stream starts after it.
    progressed: Option<u64>,
}

impl Client {
    /// Watches changes from `from` on (`Revision(0)`: from the next write), optionally only
    /// users whose id starts with `user_id_prefix`, or only changes at `location_id`.
    pub fn watch(
        &self,
        from: Revision,
        user_id_prefix: &str,
        location_id: Option<&LocationId>,
    ) -> Watcher<'_> {
        Watcher {
            client: self,
            request: pb::WatchRequest {
                from_revision: from.0,
                user_id_prefix: user_id_prefix.to_string(),
                location_id: location_id.map(ToString::to_string).unwrap_or_default(),
                progress_interval_ms: 0,
            },
            stream: None,
            endpoint: self
                .read_turn
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            last: None,
            progressed: None,
        }
    }
}

/// The error of a node that sent nothing, not even a progress notice, for too long.
fn silent_node() -> ClientError {
    ClientError::Status {
        code: tonic::Code::Unavailable,
        reason: None,
        message: "the node sent nothing for longer than its progress interval allows".to_string(),
        leader_addr: None,
        revision: None,
        refused_items: Vec::new(),
    }
}

impl Watcher<'_> {
    /// How long the watch may go without any message before the node is taken for lost.
    fn silence_limit(&self) -> std::time::Duration {
        let interval_ms = match self.request.progress_interval_ms {
            0 => PROGRESS_INTERVAL_MS_DEFAULT,
            ms => u64::from(ms),
        };
        std::time::Duration::from_millis(interval_ms) * SILENT_PROGRESS_INTERVALS_MAX
            + std::time::Duration::from_millis(SILENCE_SLACK_MS)
    }

    /// Asks for a progress notice after `interval` without events (the node's default is one
    /// second; it accepts 100 ms to 60 s).
    pub fn progress_every(mut self, interval: std::time::Duration) -> Self {
        self.request.progress_interval_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
        self
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        let endpoints = self.client.endpoints();
        let endpoint = endpoints[self.endpoint % endpoints.len()].clone();
        let channel = self.client.channel(&endpoint)?;
        let mut request = self.request.clone();
        let after_events = self.last.map(|(revision, _)| revision);
        let after_progress = self.progressed.map(|revision| revision + 1);
        if let Some(from) = after_events.max(after_progress) {
            request.from_revision = from;
        }
        let stream = WatchClient::new(channel)
            .watch(request)
            .await
            .map_err(ClientError::from_status)?
            .into_inner();
        self.stream = Some(stream);
        Ok(())
    }

    /// The next event or progress notice; `Ok(None)` if the server ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<WatchItem>, ClientError> {
        let mut failures = 0;
        loop {
            let silence_limit = self.silence_limit();
            let connected = if self.stream.is_none() {
                tokio::time::timeout(silence_limit, self.connect())
                    .await
                    .unwrap_or_else(|_| Err(silent_node()))
            } else {
                Ok(())
            };
            if let Err(error) = connected {
                if !error.is_retryable() || failures >= RECONNECT_ATTEMPTS_MAX {
                    return Err(error);
                }
                failures += 1;
                self.endpoint += 1;
                tokio::time::sleep(std::time::Duration::from_millis(RECONNECT_PAUSE_MS)).await;
                continue;
            }
            let stream = self.stream.as_mut().expect("connected above");
            let message = tokio::time::timeout(silence_limit, stream.message())
                .await
                .unwrap_or_else(|_| Err(tonic::Status::unavailable(silent_node().to_string())));
            match message {
                Ok(Some(response)) => match response.kind {
                    Some(pb::watch_response::Kind::Event(event)) => {
                        let position = (event.revision, event.index);
                        if self.last.is_some_and(|last| position <= last) {
                            continue; // Delivered before the reconnection.
                        }
                        let event = Event::try_from(event)?;
                        self.last = Some(position);
                        self.client.note_revision(event.revision);
                        return Ok(Some(WatchItem::Event(event)));
                    }
                    Some(pb::watch_response::Kind::Progress(progress)) => {
                        self.progressed = Some(progress.revision);
                        self.client.note_revision(Revision(progress.revision));
                        return Ok(Some(WatchItem::Progress(Revision(progress.revision))));
                    }
                    None => {
                        return Err(ClientError::Protocol(
                            "a watch message without content".to_string(),
                        ));
                    }
                },
                Ok(None) => return Ok(None),
                Err(status) => {
                    let error = ClientError::from_status(status);
                    let ends_the_watch = matches!(
                        error.reason(),
                        Some(ReasonCode::WatchCompacted | ReasonCode::WatcherTooSlow)
                    );
                    if ends_the_watch || !error.is_retryable() && error.reason().is_some() {
                        return Err(error);
                    }
                    // The node went away (or the connection did): resume on the next one.
                    self.stream = None;
                    self.endpoint += 1;
                    failures += 1;
                    if failures > RECONNECT_ATTEMPTS_MAX {
                        return Err(error);
                    }
                }
            }
        }
    }
}

/// One item of a state listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListedItem {
    Location(Location),
    Policy(Policy),
    Placement(Placement),
}

/// The whole state at one revision, as `ListState` streams it: where a watcher starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateListing {
    pub revision: Revision,
    pub locations: Vec<Location>,
    pub policies: Vec<Policy>,
    pub placements: Vec<Placement>,
}

impl Client {
    /// Every location, policy and placement at one revision; watch from `revision + 1` to
    /// follow on without a gap. With `allow_recent_snapshot` the node may answer from the
    /// snapshot it has rather than build one (still watchable from). The whole state is held
    /// in memory: see `list_state_into` to consume it as it streams.
    pub async fn list_state(
        &self,
        allow_recent_snapshot: bool,
    ) -> Result<StateListing, ClientError> {
        let mut listing = StateListing::default();
        listing.revision = self
            .list_state_into(allow_recent_snapshot, |item| match item {
                ListedItem::Location(location) => listing.locations.push(location),
                ListedItem::Policy(policy) => listing.policies.push(policy),
                ListedItem::Placement(placement) => listing.placements.push(placement),
            })
            .await?;
        Ok(listing)
    }

    /// `list_state`, handing each item to `sink` as it arrives (locations, then policies, then
    /// placements) and returning the revision of the listing: memory stays at one message.
    pub async fn list_state_into(
        &self,
        allow_recent_snapshot: bool,
        mut sink: impl FnMut(ListedItem),
    ) -> Result<Revision, ClientError> {
        let request = pb::ListStateRequest {
            allow_recent_snapshot,
        };
        let mut stream = self
            .call_routed(Route::Spread, request, |channel, request| async move {
                WatchClient::new(channel)
                    .max_decoding_message_size(crate::MESSAGE_BYTES_MAX)
                    .list_state(request)
                    .await
            })
            .await?;
        let mut revision: Option<u64> = None;
        while let Some(chunk) = stream.message().await.map_err(ClientError::from_status)? {
            let listed = *revision.get_or_insert(chunk.revision);
            if chunk.revision != listed {
                return Err(ClientError::Protocol(format!(
                    "a state listing changed revision midway ({listed} then {})",
                    chunk.revision
                )));
            }
            for location in chunk.locations {
                sink(ListedItem::Location(Location::try_from(location)?));
            }
            for policy in chunk.policies {
                sink(ListedItem::Policy(Policy::try_from(policy)?));
            }
            for placement in chunk.placements {
                sink(ListedItem::Placement(Placement::try_from(placement)?));
            }
        }
        let revision = Revision(
            revision.ok_or_else(|| ClientError::Protocol("an empty state listing".to_string()))?,
        );
        self.note_revision(revision);
        Ok(revision)
    }

    /// The revision a read in `consistency` would be served at. With `Linearizable`, at least
    /// the revision of every write acknowledged before this call was sent.
    pub async fn current_revision(
        &self,
        consistency: Consistency,
    ) -> Result<Revision, ClientError> {
        let message = pb::CurrentRevisionRequest {
            consistency: Some(residency_proto::convert::consistency_to_pb(consistency)),
        };
        let response = self
            .call_routed(
                Route::for_read(consistency),
                message,
                |channel, request| async move {
                    crate::registry_client(channel)
                        .current_revision(request)
                        .await
                },
            )
            .await?;
        let revision = Revision(response.header.map_or(0, |header| header.revision));
        self.note_revision(revision);
        Ok(revision)
    }
}
