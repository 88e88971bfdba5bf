//! Event mode for lock files (`spec.s3.events`): a task per LockSource long-polls the SQS queue
//! that receives the bucket's Event Notifications and hands each batch to the LockSource's sync
//! task, which reads the files named (strongly consistent GETs), updates its picture and writes.
//! A message is deleted once the files it names were read; one whose file could not be read is
//! left for SQS to deliver again. The full listing runs every `resyncInterval` as the safety net,
//! and every `sync.interval` while the queue cannot be read or the bucket does not send its events
//! there.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use kube::ResourceExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Backoff, Context, LockFile, SourceState, SyncError, reconcile};
use crate::{crd::LockSource, metrics::SqsRequestLabels, s3};

/// The most lock files read for one batch of messages.
const MAX_KEYS_PER_BATCH: usize = 100;

/// What the queue task hands over: a batch of messages, or why the queue cannot be read.
pub(super) type QueueNews = Result<Vec<s3::events::Received>, SyncError>;

/// Start the queue task of `source`, when it names a queue.
pub(super) fn start(ctx: &Arc<Context>, source: &LockSource, cancel: &CancellationToken) -> Option<mpsc::Receiver<QueueNews>> {
    source.spec.s3.as_ref()?.events.as_ref()?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(receive(ctx.clone(), source.clone(), tx, cancel.child_token()));
    Some(rx)
}

/// The next batch, or never when there is no queue.
pub(super) async fn next(rx: &mut Option<mpsc::Receiver<QueueNews>>) -> QueueNews {
    match rx {
        Some(r) => match r.recv().await {
            Some(news) => news,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn count(ctx: &Context, source: &LockSource, request: &str, n: u64) {
    let labels = SqsRequestLabels { namespace: source.namespace().unwrap_or_default(), source: source.name_any(), request: request.into() };
    ctx.metrics.locks.sqs_requests.get_or_create(&labels).inc_by(n);
}

async fn receive(ctx: Arc<Context>, source: LockSource, tx: mpsc::Sender<QueueNews>, cancel: CancellationToken) {
    let Some(files) = source.spec.s3.clone() else { return };
    let Some(events) = files.events.clone() else { return };
    let mut backoff = Backoff::new(Duration::from_secs(30));
    let mut failing = false;
    loop {
        let got = async {
            let sdk = ctx.cluster.aws.get(&ctx.client, &ctx.tenancy, &source).await?;
            let Some(sqs) = sdk.sqs.clone() else { return Ok(Vec::new()) };
            count(&ctx, &source, "ReceiveMessage", 1);
            Ok(s3::events::receive(&sqs, &events.queue_url, &files.bucket, &files.prefix, s3::events::LONG_POLL).await?)
        };
        let got: QueueNews = tokio::select! {
            r = got => r,
            () = cancel.cancelled() => return,
        };
        let pause = match &got {
            // Quiet: poll again at once (a long poll waits by itself).
            Ok(batch) if batch.is_empty() && !failing => continue,
            Ok(_) => {
                failing = false;
                backoff = Backoff::new(Duration::from_secs(30));
                Duration::ZERO
            }
            Err(e) => {
                failing = true;
                let wait = backoff.step().max(e.category().retry_after());
                warn!(error = %e, retry_in = ?wait, "could not receive from the lock files' event queue; listing meanwhile");
                wait
            }
        };
        tokio::select! {
            r = tx.send(got) => if r.is_err() { return },
            () = cancel.cancelled() => return,
        }
        if !pause.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(pause) => {},
                () = cancel.cancelled() => return,
            }
        }
    }
}

/// Take in what the queue task handed over: read the lock files a batch names, write, and delete
/// the messages handled.
pub(super) async fn handle(ctx: &Context, source: &LockSource, state: &mut SourceState, news: QueueNews) -> Result<(), SyncError> {
    let batch = match news {
        Ok(batch) => {
            if let Some(was) = state.queue_trouble.take() {
                info!(was = %was, "the lock files' event queue can be read again");
            }
            batch
        }
        Err(e) => {
            state.queue_trouble = Some(e.to_string());
            return Ok(());
        }
    };
    let (Some(files), Some(sdk)) = (source.spec.s3.as_ref(), state.clients.clone()) else { return Ok(()) };
    let (Some(events), Some(client), Some(sqs)) = (files.events.as_ref(), sdk.s3.as_ref(), sdk.sqs.as_ref()) else { return Ok(()) };
    // At most MAX_KEYS_PER_BATCH files are read per batch (a message can name many keys): the
    // messages naming others are left for SQS to deliver again.
    let keys: BTreeSet<String> = batch.iter().flat_map(|m| m.keys.iter().cloned()).collect();
    let mut unread: BTreeSet<String> = keys.iter().skip(MAX_KEYS_PER_BATCH).cloned().collect();
    let keys: BTreeSet<String> = keys.into_iter().take(MAX_KEYS_PER_BATCH).collect();
    let mut changed = false;
    for key in &keys {
        super::count_s3(ctx, source, "GET", 1);
        match s3::read_lock_file(client, &files.bucket, key).await {
            Ok(Some(read)) => {
                if state.files.get(key).is_none_or(|f| f.etag != read.etag) {
                    state.files.insert(key.clone(), LockFile { etag: read.etag, record: read.record });
                    changed = true;
                }
            }
            Ok(None) => changed |= state.files.remove(key).is_some(),
            Err(e) => {
                warn!(key = %key, error = %e, "could not read a lock file an event named; its message is received again later");
                unread.insert(key.clone());
            }
        }
    }
    let malformed = batch.iter().filter(|m| m.malformed).count();
    if malformed > 0 {
        warn!(malformed, "messages on the lock files' event queue that are not S3 notifications; deleted");
    }
    // Nothing is written before the first listing (an incomplete picture), nor while the table
    // of a LockSource with both stores is not read yet.
    let writable = state.files_listed && (source.spec.dynamodb.is_none() || (state.scanned && !state.catching_up));
    let written = if changed && writable { reconcile(ctx, source, state).await.map(|_| ()) } else { Ok(()) };
    let handled: Vec<String> = batch.into_iter().filter(|m| !m.keys.iter().any(|k| unread.contains(k))).map(|m| m.receipt_handle).collect();
    if !handled.is_empty() {
        let sent = s3::events::delete(sqs, &events.queue_url, &handled).await;
        count(ctx, source, "DeleteMessageBatch", handled.len().div_ceil(10) as u64);
        sent?;
    }
    written
}

/// Whether the full listing is due: always without a queue, at `resyncInterval` with one that
/// works, and at every pass while the queue cannot be read or the bucket does not send there.
pub(super) fn listing_due(source: &LockSource, state: &SourceState) -> bool {
    let Some(events) = source.spec.s3.as_ref().and_then(|s| s.events.as_ref()) else { return true };
    state.queue_trouble.is_some()
        || state.events_unconfigured.is_some()
        || state.last_listing.is_none_or(|t: Instant| t.elapsed() >= events.resync_interval.get())
}

/// After a full listing in event mode: check that the bucket sends its lock files' events to the
/// queue (GetBucketNotificationConfiguration), so that a bucket nobody configured is not
/// mistaken for a quiet one. A check that cannot be made (no permission) is not a finding.
pub(super) async fn check_configuration(ctx: &Context, source: &LockSource, state: &mut SourceState) {
    let (Some(files), Some(sdk)) = (source.spec.s3.as_ref(), state.clients.clone()) else { return };
    let (Some(events), Some(client)) = (files.events.as_ref(), sdk.s3.as_ref()) else { return };
    let found = s3::events::sends_to_queue(client, &files.bucket, &files.prefix, &events.queue_url).await;
    super::count_s3(ctx, source, "GET", 1);
    // A check that cannot be made is said in the Ready condition, but does not turn event mode off.
    state.events_unverified = None;
    let finding = match found {
        Ok(s3::events::Delivery::Complete) => None,
        Ok(s3::events::Delivery::Missing(what)) => Some(what),
        Err(e) => {
            warn!(error = %e, "could not read the bucket's notification configuration; assuming it sends to the queue");
            state.events_unverified = Some(e.to_string());
            None
        }
    };
    if finding != state.events_unconfigured {
        match &finding {
            Some(what) => warn!(problem = %what, "the bucket does not send its lock files' events to the queue; listing every pass"),
            None if state.events_unconfigured.is_some() => info!("the bucket sends its lock files' events to the queue"),
            None => {}
        }
        state.events_unconfigured = finding;
    }
}
