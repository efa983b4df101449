//! Peer calls made one at a time, on one long-lived gRPC stream instead of a call each: a
//! request, its answer, the next request. openraft 0.9 sends one AppendEntries at a time to
//! each follower, and a follower forwards one group of writes at a time to the leader; on a
//! stream each costs two messages instead of a call's headers, routing, authorization and
//! server task.
//!
//! Whoever holds a [`CallStream`] drops it on any failure and on a missed deadline (the future
//! holding it is dropped with it), so a late answer is never taken for a later request's.

use std::future::Future;

use residency_proto::peer_pb::RaftPayload;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// What a client's streaming method takes: the requests to send, as they come.
pub type Requests = ReceiverStream<RaftPayload>;

/// An open stream with no request outstanding.
#[derive(Debug)]
pub struct CallStream {
    requests: mpsc::Sender<RaftPayload>,
    answers: Streaming<RaftPayload>,
}

/// A stream that failed: what failed, and whether its request surely never left (the stream
/// was closed before it was sent, so sending it again cannot apply it twice).
#[derive(Debug)]
pub struct Failed {
    pub status: Status,
    pub unsent: bool,
}

impl From<Status> for Failed {
    fn from(status: Status) -> Failed {
        Failed {
            status,
            unsent: false,
        }
    }
}

impl CallStream {
    /// Opens a stream with `open` (a client's streaming method), its first request sent with
    /// the opening, and waits for that request's answer. `rpc` names the stream in
    /// `residency_peer_streams_opened_total`.
    pub async fn open<F, Fut>(
        rpc: &'static str,
        payload: RaftPayload,
        open: F,
    ) -> Result<(CallStream, RaftPayload), Status>
    where
        F: FnOnce(Requests) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<RaftPayload>>, Status>>,
    {
        metrics::counter!("residency_peer_streams_opened_total", "rpc" => rpc).increment(1);
        // One request outstanding at a time: the channel never holds more than one.
        let (requests, unsent) = mpsc::channel(1);
        requests
            .try_send(payload)
            .expect("a new channel of one has room for one");
        let answers = open(ReceiverStream::new(unsent)).await?.into_inner();
        CallStream { requests, answers }.answer().await
    }

    /// Sends `payload` on `held`, or on a stream `open` opens when there is none. When the held
    /// stream fails, the request goes again on a new one if it surely never left
    /// (`Failed::unsent`), or if `resend_after_failure` says that receiving it twice is harmless
    /// (an AppendEntries on a stream taken from the idle pool, which may have died while idle);
    /// otherwise the failure is the answer, since the request may have been acted on.
    pub async fn call_or_open<F, Fut>(
        held: Option<CallStream>,
        resend_after_failure: bool,
        rpc: &'static str,
        payload: RaftPayload,
        open: F,
    ) -> Result<(CallStream, RaftPayload), Status>
    where
        F: FnOnce(Requests) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<RaftPayload>>, Status>>,
    {
        let Some(held) = held else {
            return CallStream::open(rpc, payload, open).await;
        };
        match held.call(payload.clone()).await {
            Ok(answered) => Ok(answered),
            Err(failed) if failed.unsent || resend_after_failure => {
                CallStream::open(rpc, payload, open).await
            }
            Err(failed) => Err(failed.status),
        }
    }

    /// Sends the next request and waits for its answer.
    pub async fn call(self, payload: RaftPayload) -> Result<(CallStream, RaftPayload), Failed> {
        if self.requests.send(payload).await.is_err() {
            return Err(Failed {
                status: Status::unavailable("the peer stream had closed"),
                unsent: true,
            });
        }
        Ok(self.answer().await?)
    }

    async fn answer(mut self) -> Result<(CallStream, RaftPayload), Status> {
        let answer = self
            .answers
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the peer ended the stream"))?;
        Ok((self, answer))
    }
}
