//! Reading a table's DynamoDB Stream: every open shard from LATEST (the Scan that follows covers
//! what came before), child shards from TRIM_HORIZON once their parent closes.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use aws_sdk_dynamodb::{error::DisplayErrorContext, primitives::Blob, types::AttributeValue};
use aws_sdk_dynamodbstreams::types::{AttributeValue as StreamValue, OperationType, ShardIteratorType};

/// How often the shard list is re-read to find new shards.
const SHARD_REFRESH: Duration = Duration::from_secs(10);

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

/// A stream that could not be read; the caller falls back to a full Scan and reopens it.
#[derive(Debug, thiserror::Error)]
#[error("failed to read the DynamoDB stream {arn}: {message}")]
pub struct StreamError {
    pub arn: String,
    pub message: String,
}

/// An open stream.
pub struct StreamReader {
    client: aws_sdk_dynamodbstreams::Client,
    arn: String,
    /// Open iterators by shard id; `None` once the shard is closed and drained.
    iterators: BTreeMap<String, Option<String>>,
    last_refresh: Instant,
}

impl StreamReader {
    /// Start reading at the current end of every open shard.
    pub async fn open(client: aws_sdk_dynamodbstreams::Client, arn: String) -> Result<Self, StreamError> {
        let mut reader = Self { client, arn, iterators: BTreeMap::new(), last_refresh: Instant::now() };
        for (shard, open) in reader.shards().await? {
            if open {
                let it = reader.iterator(&shard, ShardIteratorType::Latest).await?;
                reader.iterators.insert(shard, Some(it));
            } else {
                reader.iterators.insert(shard, None);
            }
        }
        Ok(reader)
    }

    fn err(&self, e: impl std::error::Error) -> StreamError {
        StreamError { arn: self.arn.clone(), message: e.to_string() }
    }

    /// (shard id, still open) for every shard of the stream.
    async fn shards(&self) -> Result<Vec<(String, bool)>, StreamError> {
        let mut out = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let d = self
                .client
                .describe_stream()
                .stream_arn(&self.arn)
                .set_exclusive_start_shard_id(start.take())
                .send()
                .await
                .map_err(|e| StreamError { arn: self.arn.clone(), message: DisplayErrorContext(&e).to_string() })?;
            let desc = d.stream_description;
            let shards = desc.as_ref().and_then(|s| s.shards.clone()).unwrap_or_default();
            for s in &shards {
                let id = s.shard_id.clone().unwrap_or_default();
                let open = s.sequence_number_range.as_ref().is_none_or(|r| r.ending_sequence_number.is_none());
                out.push((id, open));
            }
            match desc.and_then(|s| s.last_evaluated_shard_id) {
                Some(last) if !last.is_empty() => start = Some(last),
                _ => return Ok(out),
            }
        }
    }

    async fn iterator(&self, shard: &str, kind: ShardIteratorType) -> Result<String, StreamError> {
        let r = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.arn)
            .shard_id(shard)
            .shard_iterator_type(kind)
            .send()
            .await
            .map_err(|e| StreamError { arn: self.arn.clone(), message: DisplayErrorContext(&e).to_string() })?;
        r.shard_iterator.ok_or_else(|| self.err(std::io::Error::other("no shard iterator returned")))
    }

    /// Read what arrived since the last poll.
    pub async fn poll(&mut self) -> Result<Vec<ItemChange>, StreamError> {
        let mut changes = Vec::new();
        let mut closed = false;
        let shards: Vec<(String, String)> = self.iterators.iter().filter_map(|(s, it)| it.clone().map(|i| (s.clone(), i))).collect();
        for (shard, it) in shards {
            let r = self
                .client
                .get_records()
                .shard_iterator(it)
                .limit(1000)
                .send()
                .await
                .map_err(|e| StreamError { arn: self.arn.clone(), message: DisplayErrorContext(&e).to_string() })?;
            for rec in r.records.unwrap_or_default() {
                let Some(data) = rec.dynamodb else { continue };
                let key = data.keys.as_ref().and_then(|k| k.get("LockID")).and_then(|v| v.as_s().ok()).cloned();
                match (rec.event_name, data.new_image, key) {
                    (Some(OperationType::Remove), _, Some(k)) => changes.push(ItemChange::Removed(k)),
                    (_, Some(img), _) => changes.push(ItemChange::Put(convert_map(img))),
                    (_, None, Some(k)) => changes.push(ItemChange::Touched(k)),
                    _ => {}
                }
            }
            if r.next_shard_iterator.is_none() {
                closed = true;
            }
            self.iterators.insert(shard, r.next_shard_iterator);
        }
        if closed || self.last_refresh.elapsed() >= SHARD_REFRESH {
            self.last_refresh = Instant::now();
            for (shard, _) in self.shards().await? {
                if !self.iterators.contains_key(&shard) {
                    // A shard that appeared after we opened the stream: read it from its start.
                    let it = self.iterator(&shard, ShardIteratorType::TrimHorizon).await?;
                    self.iterators.insert(shard, Some(it));
                }
            }
        }
        Ok(changes)
    }
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
