//! Event mode for lock files: the bucket's S3 Event Notifications, delivered to an SQS queue,
//! say which lock files changed. An event is only a hint that a file should be read again: the
//! mirror reads the file (strongly consistent) and shows what the read returns, so events that
//! arrive late, twice or out of order change nothing but the moment of the read.
//!
//! Accepted message bodies: S3's own notification (`{"Records": [...]}`), the same wrapped in an
//! SNS envelope (`{"Type": "Notification", "Message": "..."}`, for a topic fanned out to the
//! queue), and S3's `s3:TestEvent` (ignored). Anything else is counted as malformed and deleted,
//! so that it is not received again and again.

use std::time::Duration;

use serde::Deserialize;

use super::{LOCK_SUFFIX, S3Error, category_of, message_of};

/// The longest wait of one ReceiveMessage (SQS allows 20 s): a quiet queue costs three requests
/// a minute.
pub const LONG_POLL: Duration = Duration::from_secs(20);
/// The most messages one ReceiveMessage returns (SQS allows 10).
const BATCH: i32 = 10;
/// The most records a message may hold (S3 sends one): a batch names at most 100 lock files.
const MAX_RECORDS: usize = 10;

/// The SQS client for a queue: the SDK configuration `config`, with an attempt timeout longer
/// than a long poll (the configuration's own, 10 s, would cut every quiet long poll short and
/// turn a quiet queue into an error).
pub fn queue_client(config: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    let timeouts = aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(LONG_POLL + Duration::from_secs(10))
        .build();
    aws_sdk_sqs::Client::from_conf(aws_sdk_sqs::config::Builder::from(config).timeout_config(timeouts).build())
}

/// A received message: the lock files it names, and its receipt handle (to delete it once
/// handled).
#[derive(Debug)]
pub struct Received {
    pub receipt_handle: String,
    pub keys: Vec<String>,
    /// The body was not an S3 notification (or an SNS envelope of one).
    pub malformed: bool,
}

/// Wait up to `wait` for messages on `queue_url`; the lock-file keys each names in `bucket`
/// under `prefix`.
pub async fn receive(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    bucket: &str,
    prefix: &str,
    wait: Duration,
) -> Result<Vec<Received>, S3Error> {
    let out = client
        .receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(BATCH)
        .wait_time_seconds(i32::try_from(wait.as_secs().min(20)).unwrap_or(20))
        .send()
        .await
        .map_err(|e| S3Error::Queue { queue: queue_url.to_owned(), message: message_of(&e), category: category_of(&e) })?;
    Ok(out
        .messages
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let receipt_handle = m.receipt_handle?;
            let (keys, malformed) = match lock_files_named(m.body.as_deref().unwrap_or_default(), bucket, prefix) {
                Some(keys) => (keys, false),
                None => (Vec::new(), true),
            };
            Some(Received { receipt_handle, keys, malformed })
        })
        .collect())
}

/// Delete handled messages (in batches of ten, as SQS takes them); the number of requests made.
pub async fn delete(client: &aws_sdk_sqs::Client, queue_url: &str, receipt_handles: &[String]) -> Result<u64, S3Error> {
    let mut requests = 0;
    for chunk in receipt_handles.chunks(10) {
        let entries: Vec<_> = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(h).build().ok()
            })
            .collect();
        requests += 1;
        let out =
            client.delete_message_batch().queue_url(queue_url).set_entries(Some(entries)).send().await.map_err(|e| S3Error::Queue {
                queue: queue_url.to_owned(),
                message: message_of(&e),
                category: category_of(&e),
            })?;
        if let Some(f) = out.failed.first() {
            // Received again after the visibility timeout, and handled again: nothing is lost.
            tracing::warn!(failed = out.failed.len(), code = %f.code, message = ?f.message, "some handled messages could not be deleted from the queue");
        }
    }
    Ok(requests)
}

/// Whether a bucket sends the events statelock needs to a queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Created and removed lock files under the prefix reach the queue.
    Complete,
    /// What is missing, in words.
    Missing(String),
}

/// Read the bucket's notification configuration and say whether lock files created and removed
/// under `prefix` are sent to `queue_url` (its ARN ends with the account and name in the URL).
pub async fn sends_to_queue(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str, queue_url: &str) -> Result<Delivery, S3Error> {
    let conf = client.get_bucket_notification_configuration().bucket(bucket).send().await.map_err(|e| S3Error::Get {
        bucket: bucket.to_owned(),
        key: "?notification".into(),
        message: message_of(&e),
        category: category_of(&e),
    })?;
    let rules: Vec<QueueRule> = conf
        .queue_configurations
        .unwrap_or_default()
        .into_iter()
        .map(|q| QueueRule {
            queue_arn: q.queue_arn,
            events: q.events.iter().map(|e| e.as_str().to_owned()).collect(),
            filters: q
                .filter
                .and_then(|f| f.key)
                .and_then(|k| k.filter_rules)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| Some((r.name?.as_str().to_ascii_lowercase(), r.value?)))
                .collect(),
        })
        .collect();
    Ok(delivery(&rules, prefix, queue_url))
}

/// One queue configuration of a bucket, as [`delivery`] judges it.
#[derive(Debug)]
pub struct QueueRule {
    pub queue_arn: String,
    pub events: Vec<String>,
    /// `(prefix|suffix, value)`.
    pub filters: Vec<(String, String)>,
}

/// Whether `rules` send every created and removed lock file under `prefix` to `queue_url`. A
/// removal is `s3:ObjectRemoved:*`, or both `Delete` and `DeleteMarkerCreated` (in a versioned
/// bucket, which state buckets usually are, Terraform's DeleteObject creates a delete marker).
pub fn delivery(rules: &[QueueRule], prefix: &str, queue_url: &str) -> Delivery {
    let mut path = queue_url.rsplit('/');
    let (Some(name), Some(account)) = (path.next(), path.next()) else {
        return Delivery::Missing(format!("{queue_url} does not end with an account and a queue name"));
    };
    let ours = |arn: &str| {
        let mut parts = arn.rsplit(':');
        parts.next() == Some(name) && parts.next() == Some(account)
    };
    // The rule's key filter lets every lock file under the LockSource's prefix through.
    let covers_lock_files = |r: &QueueRule| {
        r.filters.iter().all(|(k, v)| match k.as_str() {
            "suffix" => LOCK_SUFFIX.ends_with(v.as_str()),
            "prefix" => prefix.starts_with(v.as_str()),
            _ => false,
        })
    };
    let mine: Vec<&QueueRule> = rules.iter().filter(|r| ours(&r.queue_arn) && covers_lock_files(r)).collect();
    if mine.is_empty() {
        return Delivery::Missing(format!(
            "the bucket's event notifications do not name the queue {account}/{name} for every key under {prefix:?} ending {LOCK_SUFFIX}"
        ));
    }
    let has = |event: &str| mine.iter().any(|r| r.events.iter().any(|e| e == event));
    let created = has("s3:ObjectCreated:*") || has("s3:ObjectCreated:Put");
    let removed = has("s3:ObjectRemoved:*") || (has("s3:ObjectRemoved:Delete") && has("s3:ObjectRemoved:DeleteMarkerCreated"));
    match (created, removed) {
        (true, true) => Delivery::Complete,
        (false, _) => Delivery::Missing(format!("the bucket sends no s3:ObjectCreated events to the queue {account}/{name}")),
        (_, false) => Delivery::Missing(format!(
            "the bucket sends no s3:ObjectRemoved events (or not both :Delete and :DeleteMarkerCreated) to the queue {account}/{name}"
        )),
    }
}

#[derive(Deserialize)]
struct Notification {
    #[serde(rename = "Records")]
    records: Vec<Record>,
}

#[derive(Deserialize)]
struct Record {
    s3: RecordS3,
}

#[derive(Deserialize)]
struct RecordS3 {
    bucket: RecordBucket,
    object: RecordObject,
}

#[derive(Deserialize)]
struct RecordBucket {
    name: String,
}

#[derive(Deserialize)]
struct RecordObject {
    key: String,
}

#[derive(Deserialize)]
struct SnsEnvelope {
    #[serde(rename = "Type")]
    type_: String,
    #[serde(rename = "Message")]
    message: String,
}

#[derive(Deserialize)]
struct TestEvent {
    #[serde(rename = "Event")]
    event: String,
}

/// The lock-file keys a message body names in `bucket` under `prefix` (deduplicated, in
/// order), or `None` when the body is not an S3 notification. S3 URL-encodes keys in events
/// (form encoding: `+` is a space).
pub fn lock_files_named(body: &str, bucket: &str, prefix: &str) -> Option<Vec<String>> {
    let body = match serde_json::from_str::<SnsEnvelope>(body) {
        Ok(env) if env.type_ == "Notification" => env.message,
        _ => body.to_owned(),
    };
    if serde_json::from_str::<TestEvent>(&body).is_ok_and(|t| t.event == "s3:TestEvent") {
        return Some(Vec::new());
    }
    let n: Notification = serde_json::from_str(&body).ok()?;
    // S3 sends one record per message; a message naming more is not S3's.
    if n.records.len() > MAX_RECORDS {
        return None;
    }
    let mut keys: Vec<String> = Vec::new();
    for r in n.records {
        if r.s3.bucket.name != bucket {
            continue;
        }
        let Some(key) = form_decode(&r.s3.object.key) else { continue };
        if key.ends_with(LOCK_SUFFIX) && key.starts_with(prefix) && !keys.contains(&key) {
            keys.push(key);
        }
    }
    Some(keys)
}

/// Decode `application/x-www-form-urlencoded` text (`+` is a space, `%XX` a byte); `None` when
/// it is not valid UTF-8 once decoded or an escape is broken.
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(bucket: &str, keys: &[&str]) -> String {
        let records: Vec<_> = keys
            .iter()
            .map(|k| serde_json::json!({"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": {"key": k, "eTag": "x"}}}))
            .collect();
        serde_json::json!({ "Records": records }).to_string()
    }

    #[test]
    fn notifications_name_lock_files_under_the_prefix_decoded() {
        let body = notification(
            "tfstate",
            &[
                "env%3A%2Fdev%2Fnet%2Fterraform.tfstate.tflock",
                "app/terraform.tfstate",
                "app/with+space.tflock",
                "other/x.tflock",
                "app/a.tflock",
                "app/a.tflock",
            ],
        );
        assert_eq!(
            lock_files_named(&body, "tfstate", "").expect("a notification"),
            vec!["env:/dev/net/terraform.tfstate.tflock", "app/with space.tflock", "other/x.tflock", "app/a.tflock"]
        );
        assert_eq!(lock_files_named(&body, "tfstate", "app/").expect("a notification"), vec!["app/with space.tflock", "app/a.tflock"]);
        assert_eq!(
            lock_files_named(&body, "another-bucket", "").expect("a notification"),
            Vec::<String>::new(),
            "another bucket's records are not ours"
        );
    }

    #[test]
    fn sns_envelopes_and_test_events_are_understood_and_anything_else_is_malformed() {
        let inner = notification("tfstate", &["a.tflock"]);
        let sns = serde_json::json!({"Type": "Notification", "Message": inner}).to_string();
        assert_eq!(lock_files_named(&sns, "tfstate", "").expect("a notification"), vec!["a.tflock"]);
        let test = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-30T00:00:00Z","Bucket":"tfstate"}"#;
        assert_eq!(lock_files_named(test, "tfstate", ""), Some(vec![]));
        for bad in ["", "not json", "{}", r#"{"Records": "x"}"#, r#"{"Records": [{"s3": {}}]}"#, "[1,2]", &"{".repeat(100_000)] {
            assert_eq!(lock_files_named(bad, "tfstate", ""), None, "{:?}", &bad[..bad.len().min(40)]);
        }
        // A message with more records than S3 ever sends in one is not S3's.
        let many: Vec<String> = (0..11).map(|i| format!("k{i}.tflock")).collect();
        let many = notification("tfstate", &many.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(lock_files_named(&many, "tfstate", ""), None);
        // A broken escape or a key that does not decode to UTF-8 names nothing, and nothing else is lost.
        let body = notification("tfstate", &["bad%zz.tflock", "bad%ff.tflock", "good.tflock"]);
        assert_eq!(lock_files_named(&body, "tfstate", "").expect("a notification"), vec!["good.tflock"]);
    }

    #[test]
    fn a_bucket_that_does_not_send_created_and_removed_lock_files_to_the_queue_is_found_out() {
        let url = "https://sqs.us-east-1.amazonaws.com/123456789012/statelock";
        let rule = |arn: &str, events: &[&str], filters: &[(&str, &str)]| QueueRule {
            queue_arn: arn.into(),
            events: events.iter().map(|e| (*e).to_owned()).collect(),
            filters: filters.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        };
        let arn = "arn:aws:sqs:us-east-1:123456789012:statelock";
        assert_eq!(
            delivery(&[rule(arn, &["s3:ObjectCreated:*", "s3:ObjectRemoved:*"], &[("suffix", ".tflock")])], "", url),
            Delivery::Complete
        );
        assert_eq!(
            delivery(
                &[
                    rule(arn, &["s3:ObjectCreated:Put"], &[]),
                    rule(arn, &["s3:ObjectRemoved:Delete", "s3:ObjectRemoved:DeleteMarkerCreated"], &[("prefix", "env:/")])
                ],
                "env:/dev/",
                url
            ),
            Delivery::Complete,
            "two rules together, the prefix filter covering the LockSource's prefix"
        );
        for (rules, why) in [
            (vec![], "no rule"),
            (vec![rule(arn, &["s3:ObjectCreated:*"], &[])], "no removals"),
            (vec![rule(arn, &["s3:ObjectRemoved:*"], &[])], "no creations"),
            (vec![rule("arn:aws:sqs:us-east-1:123456789012:other", &["s3:ObjectCreated:*", "s3:ObjectRemoved:*"], &[])], "another queue"),
            (
                vec![rule("arn:aws:sqs:us-east-1:999999999999:statelock", &["s3:ObjectCreated:*", "s3:ObjectRemoved:*"], &[])],
                "another account",
            ),
            (vec![rule(arn, &["s3:ObjectCreated:*", "s3:ObjectRemoved:*"], &[("suffix", ".tfstate")])], "state files only"),
            (vec![rule(arn, &["s3:ObjectCreated:*", "s3:ObjectRemoved:Delete"], &[])], "no delete markers (versioned buckets)"),
            (
                vec![rule(arn, &["s3:ObjectCreated:*", "s3:ObjectRemoved:*"], &[("prefix", "env:/")])],
                "a prefix narrower than the LockSource's",
            ),
        ] {
            assert!(matches!(delivery(&rules, "", url), Delivery::Missing(_)), "{why}");
        }
    }

    #[tokio::test]
    async fn a_long_poll_is_never_cut_short_by_the_attempt_timeout() {
        let config = crate::dynamo::sdk_config("us-east-1", Some("http://127.0.0.1:1"), None).await;
        let client = queue_client(&config);
        let attempt = client.config().timeout_config().and_then(|t| t.operation_attempt_timeout()).expect("an attempt timeout");
        assert!(attempt > LONG_POLL, "{attempt:?} must outlast a {LONG_POLL:?} long poll");
    }
}
