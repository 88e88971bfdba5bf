//! Reading a table's DynamoDB Stream as the protocol requires.
//!
//! - **Where reading starts.** [`StreamReader::open`] takes the current end (`LATEST`) of every
//!   open shard; closed shards hold only what happened before, which the Scan that follows the
//!   opening covers. Shards that appear later are read from their start (`TRIM_HORIZON`).
//! - **Lineage** ([`Lineage`], pure): a child shard is read only once its parent is drained
//!   (closed and read to its end), so that the changes of one item are applied in the order they
//!   were made, across a split.
//! - **Positions**: the last sequence number read from each shard is kept, so an expired iterator
//!   (iterators live 15 minutes) is replaced with `AFTER_SEQUENCE_NUMBER` and nothing is skipped.
//!   A position that cannot be resumed (an expired `LATEST` iterator before any record, a trimmed
//!   shard) is reported as [`StreamFailure::PositionLost`]: the caller must re-establish the
//!   truth with a Scan.
//! - **Empty pages** are normal (a page may be empty although records follow); only a shard
//!   without a next iterator is closed.
//! - Every call is counted ([`StreamCalls`]), because AWS bills stream read requests.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use aws_sdk_dynamodb::{
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    primitives::Blob,
    types::AttributeValue,
};
use aws_sdk_dynamodbstreams::types::{AttributeValue as StreamValue, OperationType, ShardIteratorType};

use crate::errors::ErrorCategory;

/// How often the shard list is re-read to find new shards when no shard closed.
const SHARD_REFRESH: Duration = Duration::from_secs(30);

/// A change to one item.
#[derive(Clone, Debug, PartialEq)]
pub enum ItemChange {
    /// The item as it is now (the stream carries new images).
    Put(HashMap<String, AttributeValue>),
    /// The item with this LockID was deleted.
    Removed(String),
    /// The item with this LockID changed; read it to know how (KEYS_ONLY streams).
    Touched(String),
}

impl ItemChange {
    /// The LockID of the item changed (none for a new image without one).
    pub fn lock_id(&self) -> Option<&str> {
        match self {
            Self::Put(item) => item.get("LockID").and_then(|v| v.as_s().ok()).map(String::as_str),
            Self::Removed(id) | Self::Touched(id) => Some(id),
        }
    }
}

/// The DynamoDB Streams calls statelock makes (the IAM actions `dynamodb:<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamCall {
    DescribeStream,
    GetShardIterator,
    GetRecords,
}

impl StreamCall {
    pub const ALL: [Self; 3] = [Self::DescribeStream, Self::GetShardIterator, Self::GetRecords];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DescribeStream => "DescribeStream",
            Self::GetShardIterator => "GetShardIterator",
            Self::GetRecords => "GetRecords",
        }
    }
}

/// Calls made, by kind; taken (and reset) by the caller for its metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCalls {
    pub describe_stream: u64,
    pub get_shard_iterator: u64,
    pub get_records: u64,
}

impl StreamCalls {
    fn add(&mut self, call: StreamCall) {
        match call {
            StreamCall::DescribeStream => self.describe_stream += 1,
            StreamCall::GetShardIterator => self.get_shard_iterator += 1,
            StreamCall::GetRecords => self.get_records += 1,
        }
    }

    pub fn get(&self, call: StreamCall) -> u64 {
        match call {
            StreamCall::DescribeStream => self.describe_stream,
            StreamCall::GetShardIterator => self.get_shard_iterator,
            StreamCall::GetRecords => self.get_records,
        }
    }
}

/// What went wrong, as far as the caller's next step is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFailure {
    /// Too many readers or requests (about two readers per shard are allowed): retry later,
    /// with the position kept.
    Throttled,
    /// Not allowed (IAM), or a request DynamoDB will never accept: retrying does not help.
    Denied,
    /// The stream is gone (disabled and expired, or the table deleted): look at the table again.
    Gone,
    /// The position cannot be resumed: the truth must be re-established with a Scan.
    PositionLost,
    /// An iterator expired (they live 15 minutes); resumable from the last record read.
    IteratorExpired,
    /// No answer, or a server error: retry later.
    Unavailable,
}

/// A stream call that failed.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB Streams {} on {arn} failed: {message}", call.as_str())]
pub struct StreamError {
    pub arn: String,
    pub call: StreamCall,
    pub failure: StreamFailure,
    pub message: String,
}

impl StreamError {
    pub fn category(&self) -> ErrorCategory {
        match self.failure {
            StreamFailure::Throttled => ErrorCategory::DynamoThrottled,
            StreamFailure::Denied | StreamFailure::Gone => ErrorCategory::DynamoRefused,
            StreamFailure::PositionLost | StreamFailure::IteratorExpired | StreamFailure::Unavailable => ErrorCategory::DynamoUnavailable,
        }
    }

    fn of_sdk<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
        arn: &str,
        call: StreamCall,
        e: SdkError<E, R>,
    ) -> Self {
        let code = match &e {
            SdkError::ServiceError(s) => s.err().code().map(str::to_owned),
            _ => None,
        };
        let failure = match code.as_deref() {
            Some("ExpiredIteratorException") => StreamFailure::IteratorExpired,
            Some("TrimmedDataAccessException") => StreamFailure::PositionLost,
            Some("ResourceNotFoundException") => StreamFailure::Gone,
            _ => match ErrorCategory::of_sdk(&e) {
                ErrorCategory::DynamoThrottled => StreamFailure::Throttled,
                ErrorCategory::DynamoRefused => StreamFailure::Denied,
                _ => StreamFailure::Unavailable,
            },
        };
        Self { arn: arn.to_owned(), call, failure, message: DisplayErrorContext(&e).to_string() }
    }
}

/// Where to resume reading a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position {
    /// The end of the shard as it was when the stream was opened; no record read since.
    Latest,
    /// The start of the shard; no record read since.
    TrimHorizon,
    /// Right after this sequence number.
    After(String),
}

/// One shard as DescribeStream lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parent: Option<String>,
    /// No ending sequence number yet.
    pub open: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ShardState {
    Reading(Position),
    /// Closed and read to its end (or closed before the stream was opened).
    Drained,
}

/// The shards of a stream and how far each was read: which may be read now, which must wait.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lineage {
    shards: BTreeMap<String, (Option<String>, ShardState)>,
}

impl Lineage {
    /// At opening: open shards from their current end, closed ones are history (the Scan covers
    /// them).
    pub fn at_open(shards: &[ShardInfo]) -> Self {
        let mut l = Self::default();
        for s in shards {
            let state = if s.open { ShardState::Reading(Position::Latest) } else { ShardState::Drained };
            l.shards.insert(s.id.clone(), (s.parent.clone(), state));
        }
        l
    }

    /// A fresh shard list: new shards are read from their start, once their parent is drained.
    /// Err: a shard being read vanished from the list (trimmed): its unread records are lost.
    pub fn refresh(&mut self, shards: &[ShardInfo]) -> Result<(), String> {
        for s in shards {
            self.shards.entry(s.id.clone()).or_insert_with(|| (s.parent.clone(), ShardState::Reading(Position::TrimHorizon)));
        }
        let listed: std::collections::BTreeSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
        if let Some(lost) = self.shards.iter().find(|(id, (_, st))| !listed.contains(id.as_str()) && matches!(st, ShardState::Reading(_))) {
            return Err(format!("shard {} is no longer listed before it was read to its end", lost.0));
        }
        // Drained shards that are no longer listed were trimmed; their children need not wait.
        self.shards.retain(|id, (_, st)| listed.contains(id.as_str()) || *st != ShardState::Drained);
        Ok(())
    }

    /// Shards that may be read now: not drained, and their parent (when still known) drained.
    pub fn readable(&self) -> Vec<(String, Position)> {
        self.shards
            .iter()
            .filter_map(|(id, (parent, st))| match st {
                ShardState::Reading(p) => {
                    let parent_done = parent.as_ref().and_then(|p| self.shards.get(p)).is_none_or(|(_, pst)| *pst == ShardState::Drained);
                    parent_done.then(|| (id.clone(), p.clone()))
                }
                ShardState::Drained => None,
            })
            .collect()
    }

    /// Records up to `last` were read from `shard`; `closed`: the shard has no more.
    pub fn advance(&mut self, shard: &str, last: Option<String>, closed: bool) {
        if let Some((_, st)) = self.shards.get_mut(shard) {
            if closed {
                *st = ShardState::Drained;
            } else if let Some(seq) = last {
                *st = ShardState::Reading(Position::After(seq));
            }
        }
    }

    /// Shards still to be read (open, or closed with records left, or waiting for a parent).
    pub fn pending(&self) -> usize {
        self.shards.values().filter(|(_, st)| *st != ShardState::Drained).count()
    }
}

/// What one poll read.
#[derive(Debug, Default)]
pub struct PollOutcome {
    /// Every record read, in order per shard (also when `error` is set).
    pub changes: Vec<ItemChange>,
    /// Every shard read returned an empty page, no shard closed and no call failed: nothing more
    /// is known to be waiting (DynamoDB may still return an empty page before records).
    pub quiet: bool,
    /// The first call that failed.
    pub error: Option<StreamError>,
}

/// An open stream.
pub struct StreamReader {
    client: aws_sdk_dynamodbstreams::Client,
    arn: String,
    lineage: Lineage,
    iterators: HashMap<String, String>,
    last_refresh: Instant,
    /// A shard closed and the shard list was not read successfully since.
    refresh_due: bool,
    calls: StreamCalls,
    /// Records read whose positions were taken but which were not handed out yet.
    unread: Vec<ItemChange>,
    /// A moment (a Scan's end) and the shards known to have been read past it.
    barrier: Option<(std::time::SystemTime, std::collections::BTreeSet<String>)>,
    /// Shards whose last page, read after the barrier settled, was empty.
    settled_empty: std::collections::BTreeSet<String>,
}

/// How long after the barrier a read must be sent for its empty page to count (see
/// [`StreamReader::past`]); two such empty pages in a row are needed, since one may be empty
/// although records follow.
const STREAM_SETTLE: Duration = Duration::from_secs(1);
/// Seconds by which a record's creation time must pass the barrier to count: DynamoDB rounds it
/// down to the second, and its clock and this host's may differ by a little.
const RECORD_MARGIN_SECS: i64 = 2;

impl StreamReader {
    /// Start reading at the current end of every open shard.
    pub async fn open(client: aws_sdk_dynamodbstreams::Client, arn: String) -> Result<Self, StreamError> {
        let mut reader = Self {
            client,
            arn,
            lineage: Lineage::default(),
            iterators: HashMap::new(),
            last_refresh: Instant::now(),
            refresh_due: false,
            calls: StreamCalls::default(),
            unread: Vec::new(),
            barrier: None,
            settled_empty: std::collections::BTreeSet::new(),
        };
        let shards = reader.shards().await?;
        reader.lineage = Lineage::at_open(&shards);
        // Take every LATEST position now, before the Scan that follows.
        for (shard, position) in reader.lineage.readable() {
            let it = reader.iterator(&shard, &position).await?;
            reader.iterators.insert(shard, it);
        }
        Ok(reader)
    }

    /// From now on, note which shards are read past `at` (see [`Self::past`]).
    pub fn set_barrier(&mut self, at: std::time::SystemTime) {
        self.barrier = Some((at, std::collections::BTreeSet::new()));
        self.settled_empty.clear();
    }

    /// Every shard that may be read now was read past the barrier: a record created
    /// [`RECORD_MARGIN_SECS`] after it, or two empty pages in a row from reads sent
    /// [`STREAM_SETTLE`] after it, or its end; and no closed shard's children are still unknown.
    /// Then every record written before the barrier has been handed out (as far as the stream's
    /// delivery allows: a record that appears later than that is a brief wrong state, fixed by
    /// the next poll).
    pub fn past(&self) -> bool {
        let Some((_, done)) = &self.barrier else { return false };
        !self.refresh_due && self.unread.is_empty() && self.lineage.readable().iter().all(|(s, _)| done.contains(s))
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// The calls made since the last time this was asked.
    pub fn take_calls(&mut self) -> StreamCalls {
        std::mem::take(&mut self.calls)
    }

    /// (shard, parent, still open) for every shard of the stream.
    async fn shards(&mut self) -> Result<Vec<ShardInfo>, StreamError> {
        let mut out = Vec::new();
        let mut start: Option<String> = None;
        loop {
            self.calls.add(StreamCall::DescribeStream);
            let d = self
                .client
                .describe_stream()
                .stream_arn(&self.arn)
                .set_exclusive_start_shard_id(start.take())
                .send()
                .await
                .map_err(|e| StreamError::of_sdk(&self.arn, StreamCall::DescribeStream, e))?;
            let desc = d.stream_description;
            for s in desc.as_ref().and_then(|s| s.shards.as_ref()).map(Vec::as_slice).unwrap_or_default() {
                out.push(ShardInfo {
                    id: s.shard_id.clone().unwrap_or_default(),
                    parent: s.parent_shard_id.clone().filter(|p| !p.is_empty()),
                    open: s.sequence_number_range.as_ref().is_none_or(|r| r.ending_sequence_number.is_none()),
                });
            }
            match desc.and_then(|s| s.last_evaluated_shard_id) {
                Some(last) if !last.is_empty() => start = Some(last),
                _ => return Ok(out),
            }
        }
    }

    async fn iterator(&mut self, shard: &str, position: &Position) -> Result<String, StreamError> {
        self.calls.add(StreamCall::GetShardIterator);
        let req = self.client.get_shard_iterator().stream_arn(&self.arn).shard_id(shard);
        let req = match position {
            Position::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
            Position::TrimHorizon => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            Position::After(seq) => req.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(seq),
        };
        let r = req.send().await.map_err(|e| StreamError::of_sdk(&self.arn, StreamCall::GetShardIterator, e))?;
        r.shard_iterator.ok_or_else(|| StreamError {
            arn: self.arn.clone(),
            call: StreamCall::GetShardIterator,
            failure: StreamFailure::Unavailable,
            message: format!("no shard iterator returned for shard {shard}"),
        })
    }

    /// Read one page from every shard that may be read now. What was read is always handed out,
    /// with the first error, if any: a shard that is throttled or unavailable does not hold back
    /// the others (its position is kept and it is read again next time); an error that means the
    /// stream cannot be followed from here (gone, position lost) ends the poll.
    pub async fn poll(&mut self) -> PollOutcome {
        let mut out = PollOutcome::default();
        let mut quiet = true;
        let mut closed_any = false;
        for (shard, position) in self.lineage.readable() {
            match self.read_shard(&shard, &position).await {
                Ok(ShardPage { records, closed }) => {
                    quiet &= records == 0 && !closed;
                    closed_any |= closed;
                }
                Err(e) => {
                    quiet = false;
                    let fatal = matches!(e.failure, StreamFailure::Gone | StreamFailure::PositionLost);
                    out.error.get_or_insert(e);
                    if fatal {
                        out.changes = std::mem::take(&mut self.unread);
                        return out;
                    }
                }
            }
        }
        // A closed shard's children must be known before anything can be called quiet: the
        // shard list is read again until that succeeds.
        self.refresh_due |= closed_any;
        if self.refresh_due || self.last_refresh.elapsed() >= SHARD_REFRESH || self.lineage.pending() == 0 {
            quiet = false;
            match self.refresh().await {
                Ok(()) => {
                    self.refresh_due = false;
                    self.last_refresh = Instant::now();
                }
                Err(e) => {
                    out.error.get_or_insert(e);
                }
            }
        }
        out.changes = std::mem::take(&mut self.unread);
        out.quiet = quiet && out.error.is_none();
        out
    }

    async fn refresh(&mut self) -> Result<(), StreamError> {
        let shards = self.shards().await?;
        self.lineage.refresh(&shards).map_err(|message| StreamError {
            arn: self.arn.clone(),
            call: StreamCall::DescribeStream,
            failure: StreamFailure::PositionLost,
            message,
        })?;
        if self.lineage.pending() == 0 {
            return Err(StreamError {
                arn: self.arn.clone(),
                call: StreamCall::DescribeStream,
                failure: StreamFailure::Gone,
                message: "every shard of the stream is closed and read: the stream was disabled or replaced".into(),
            });
        }
        Ok(())
    }

    /// One page of one shard, its records kept in `unread`.
    async fn read_shard(&mut self, shard: &str, position: &Position) -> Result<ShardPage, StreamError> {
        let it = match self.iterators.get(shard) {
            Some(it) => it.clone(),
            None => {
                let it = self.iterator(shard, position).await?;
                self.iterators.insert(shard.to_owned(), it.clone());
                it
            }
        };
        self.calls.add(StreamCall::GetRecords);
        let sent = std::time::SystemTime::now();
        let page = match self.client.get_records().shard_iterator(it).limit(1000).send().await {
            Ok(page) => page,
            Err(e) => {
                let err = StreamError::of_sdk(&self.arn, StreamCall::GetRecords, e);
                if matches!(err.failure, StreamFailure::PositionLost | StreamFailure::IteratorExpired) {
                    self.iterators.remove(shard);
                }
                if err.failure == StreamFailure::IteratorExpired && *position != Position::Latest {
                    // Resumed from the position kept: the next poll takes a new iterator.
                    return Ok(ShardPage { records: 0, closed: false });
                }
                if err.failure == StreamFailure::IteratorExpired {
                    return Err(StreamError {
                        failure: StreamFailure::PositionLost,
                        message: format!(
                            "the iterator at the end of shard {shard} expired before a record was read; records may have been missed: {}",
                            err.message
                        ),
                        ..err
                    });
                }
                return Err(err);
            }
        };
        let records = page.records.unwrap_or_default();
        let count = records.len();
        let mut last = None;
        let barrier_secs = self.barrier.as_ref().and_then(|(at, _)| at.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs());
        let settled_empty =
            count == 0 && self.barrier.as_ref().is_some_and(|(at, _)| sent.duration_since(*at).is_ok_and(|d| d >= STREAM_SETTLE));
        // Two settled empty pages in a row.
        let mut past = settled_empty && !self.settled_empty.insert(shard.to_owned());
        if !settled_empty {
            self.settled_empty.remove(shard);
        }
        for rec in records {
            let Some(data) = rec.dynamodb else { continue };
            last = data.sequence_number.clone().or(last);
            if let (Some(b), Some(created)) = (barrier_secs, data.approximate_creation_date_time) {
                past |= created.secs() >= i64::try_from(b).unwrap_or(i64::MAX).saturating_add(RECORD_MARGIN_SECS);
            }
            let key = data.keys.as_ref().and_then(|k| k.get("LockID")).and_then(|v| v.as_s().ok()).cloned();
            match (rec.event_name, data.new_image, key) {
                (Some(OperationType::Remove), _, Some(k)) => self.unread.push(ItemChange::Removed(k)),
                (_, Some(img), _) => self.unread.push(ItemChange::Put(convert_map(img))),
                (_, None, Some(k)) => self.unread.push(ItemChange::Touched(k)),
                _ => {}
            }
        }
        let closed = page.next_shard_iterator.is_none();
        match page.next_shard_iterator {
            Some(next) => {
                self.iterators.insert(shard.to_owned(), next);
            }
            None => {
                self.iterators.remove(shard);
            }
        }
        self.lineage.advance(shard, last, closed);
        if let Some((_, done)) = self.barrier.as_mut()
            && (past || closed)
        {
            done.insert(shard.to_owned());
        }
        Ok(ShardPage { records: count, closed })
    }
}

struct ShardPage {
    records: usize,
    closed: bool,
}

fn convert_map(m: HashMap<String, StreamValue>) -> HashMap<String, AttributeValue> {
    m.into_iter().map(|(k, v)| (k, convert(v))).collect()
}

/// The streams SDK has its own AttributeValue type; convert to the table SDK's.
fn convert(v: StreamValue) -> AttributeValue {
    match v {
        StreamValue::S(s) => AttributeValue::S(s),
        StreamValue::N(n) => AttributeValue::N(n),
        StreamValue::B(b) => AttributeValue::B(Blob::new(b.into_inner())),
        StreamValue::Bool(b) => AttributeValue::Bool(b),
        StreamValue::Null(n) => AttributeValue::Null(n),
        StreamValue::M(m) => AttributeValue::M(convert_map(m)),
        StreamValue::L(l) => AttributeValue::L(l.into_iter().map(convert).collect()),
        StreamValue::Ss(s) => AttributeValue::Ss(s),
        StreamValue::Ns(n) => AttributeValue::Ns(n),
        StreamValue::Bs(b) => AttributeValue::Bs(b.into_iter().map(|x| Blob::new(x.into_inner())).collect()),
        _ => AttributeValue::Null(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parent: Option<&str>, open: bool) -> ShardInfo {
        ShardInfo { id: id.into(), parent: parent.map(Into::into), open }
    }

    fn ids(l: &Lineage) -> Vec<String> {
        l.readable().into_iter().map(|(s, _)| s).collect()
    }

    /// The LockID a change is about: what the mirror matches the gateway's nudges against.
    #[test]
    fn a_change_names_its_lock_id() {
        let item =
            HashMap::from([("LockID".to_owned(), AttributeValue::S("b/k".into())), ("Info".to_owned(), AttributeValue::S("{}".into()))]);
        assert_eq!(ItemChange::Put(item).lock_id(), Some("b/k"));
        assert_eq!(ItemChange::Removed("b/r".into()).lock_id(), Some("b/r"));
        assert_eq!(ItemChange::Touched("b/t".into()).lock_id(), Some("b/t"));
        let odd = HashMap::from([("LockID".to_owned(), AttributeValue::N("1".into()))]);
        assert_eq!(ItemChange::Put(odd).lock_id(), None, "a LockID that is not a string names nothing");
        assert_eq!(ItemChange::Put(HashMap::new()).lock_id(), None);
    }

    #[test]
    fn closed_shards_at_opening_are_history_and_open_ones_start_at_latest() {
        let l = Lineage::at_open(&[shard("a", None, false), shard("b", Some("a"), true)]);
        assert_eq!(l.readable(), vec![("b".to_owned(), Position::Latest)]);
    }

    #[test]
    fn a_child_waits_until_its_parent_is_drained() {
        let mut l = Lineage::at_open(&[shard("a", None, true)]);
        l.advance("a", Some("10".into()), false);
        // The split: a closes, b and c appear.
        l.refresh(&[shard("a", None, false), shard("b", Some("a"), true), shard("c", Some("a"), true)]).expect("refresh");
        assert_eq!(ids(&l), vec!["a"], "children are not read before their parent is drained");
        assert_eq!(l.readable()[0].1, Position::After("10".into()), "the parent resumes after its last record");
        l.advance("a", Some("12".into()), true);
        assert_eq!(l.readable(), vec![("b".to_owned(), Position::TrimHorizon), ("c".to_owned(), Position::TrimHorizon)]);
    }

    #[test]
    fn grandchildren_listed_at_once_wait_for_the_whole_line() {
        let mut l = Lineage::at_open(&[shard("a", None, true)]);
        l.refresh(&[shard("a", None, false), shard("b", Some("a"), false), shard("c", Some("b"), true)]).expect("refresh");
        assert_eq!(ids(&l), vec!["a"]);
        l.advance("a", None, true);
        assert_eq!(ids(&l), vec!["b"]);
        l.advance("b", Some("5".into()), true);
        assert_eq!(ids(&l), vec!["c"]);
    }

    #[test]
    fn empty_pages_keep_the_position() {
        let mut l = Lineage::at_open(&[shard("a", None, true)]);
        l.advance("a", Some("7".into()), false);
        l.advance("a", None, false);
        assert_eq!(l.readable(), vec![("a".to_owned(), Position::After("7".into()))]);
    }

    #[test]
    fn a_trimmed_parent_does_not_block_its_child_but_a_vanished_unread_shard_is_an_error() {
        let mut l = Lineage::at_open(&[shard("a", None, false), shard("b", Some("a"), true)]);
        l.refresh(&[shard("b", Some("a"), true)]).expect("a drained shard may be trimmed");
        assert_eq!(ids(&l), vec!["b"]);
        assert!(l.refresh(&[shard("c", None, true)]).is_err(), "b vanished while being read");
    }

    #[test]
    fn everything_drained_means_nothing_pending() {
        let mut l = Lineage::at_open(&[shard("a", None, true)]);
        assert_eq!(l.pending(), 1);
        l.advance("a", None, true);
        assert_eq!(l.pending(), 0);
    }
}
