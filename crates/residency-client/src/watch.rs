//! Following changes: a watcher that resumes on another node when its node fails, without
//! skipping or repeating an event.

use residency_proto::pb;
use residency_proto::pb::watch_client::WatchClient;
use residency_types::{Event, LocationId, ReasonCode, Revision};
use tonic::Streaming;

use crate::{Client, ClientError};

/// Reconnection attempts in a row before the watcher gives up.
const RECONNECT_ATTEMPTS_MAX: usize = 10;
const RECONNECT_PAUSE_MS: u64 = 300;

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
            },
            stream: None,
            endpoint: 0,
            last: None,
            progressed: None,
        }
    }
}

impl Watcher<'_> {
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
            if self.stream.is_none()
                && let Err(error) = self.connect().await
            {
                if !error.is_retryable() || failures >= RECONNECT_ATTEMPTS_MAX {
                    return Err(error);
                }
                failures += 1;
                self.endpoint += 1;
                tokio::time::sleep(std::time::Duration::from_millis(RECONNECT_PAUSE_MS)).await;
                continue;
            }
            let stream = self.stream.as_mut().expect("connected above");
            match stream.message().await {
                Ok(Some(response)) => match response.kind {
                    Some(pb::watch_response::Kind::Event(event)) => {
                        let position = (event.revision, event.index);
                        if self.last.is_some_and(|last| position <= last) {
                            continue; // Delivered before the reconnection.
                        }
                        let event = Event::try_from(event)?;
                        self.last = Some(position);
                        return Ok(Some(WatchItem::Event(event)));
                    }
                    Some(pb::watch_response::Kind::Progress(progress)) => {
                        self.progressed = Some(progress.revision);
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
