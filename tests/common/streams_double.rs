//! A DynamoDB endpoint for tests: table calls go to moto (the real table), and every write that
//! moto accepted becomes a stream record in a DynamoDB Streams of the double's own, which speaks
//! the real protocol over HTTP (DescribeStream, GetShardIterator, GetRecords) and does what
//! moto's single never-splitting shard cannot: split and close shards, expire iterators,
//! throttle, answer empty pages, refuse access, and replace or disable the stream (a new ARN).
//!
//! `DescribeTable` answers are moto's, with the stream part rewritten to the double's stream.
//! Writes are forwarded one at a time, so the stream's order is the table's commit order.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TABLE_PREFIX: &str = "DynamoDB_20120810.";
const STREAMS_PREFIX: &str = "DynamoDBStreams_20120810.";

#[derive(Clone, Debug)]
struct Record {
    seq: u64,
    event: &'static str,
    key: String,
    image: Option<Value>,
    at: f64,
    /// When the write was made, and how many more GetRecords pages must leave the record out
    /// (see [`Faults::propagation`] and [`Faults::hide_for_polls`]).
    written: Instant,
    hidden_polls: u64,
}

#[derive(Debug)]
struct Shard {
    id: String,
    parent: Option<String>,
    start: u64,
    /// Sequence number of the last record when closed.
    end: Option<u64>,
    records: Vec<Record>,
}

#[derive(Debug)]
struct Stream {
    arn: String,
    enabled: bool,
    shards: Vec<Shard>,
}

/// Faults armed by the test.
#[derive(Debug, Default)]
pub struct Faults {
    /// The next n GetRecords calls fail with LimitExceededException.
    pub throttle_next: u64,
    /// Every GetRecords fails with LimitExceededException until cleared.
    pub throttle_all: bool,
    /// Every stream call fails with AccessDeniedException until cleared.
    pub deny: bool,
    /// The next n GetRecords calls return an empty page without moving.
    pub empty_next: u64,
    /// GetRecords on these shards returns empty pages without moving (a lagging shard).
    pub stalled: std::collections::HashSet<String>,
    /// Every Scan fails with AccessDeniedException (a role allowed the stream but not Scan).
    pub deny_scan: bool,
    /// A record is readable only this long after its write (as in DynamoDB, where a record
    /// trails its write): GetRecords pages end before the first younger record.
    pub propagation: Duration,
    /// A record written while this is n is left out of the first n GetRecords pages that reach
    /// it (a record that trails its write, counted in polls rather than time).
    pub hide_for_polls: u64,
}

#[derive(Default)]
struct Inner {
    streams: Vec<Stream>,
    next_seq: u64,
    next_shard: u64,
    /// Iterators issued before this instant are expired.
    expired_before: Option<Instant>,
    iterators: HashMap<String, (String, String, usize, Instant)>,
    next_iterator: u64,
    faults: Faults,
    /// Calls received, by X-Amz-Target operation name.
    calls: BTreeMap<String, u64>,
    /// Records returned by GetRecords, by LockID.
    served: HashMap<String, u64>,
    /// Operations received, by the access key that signed them.
    by_key: BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl Inner {
    fn current(&mut self) -> Option<&mut Stream> {
        self.streams.last_mut().filter(|s| s.enabled)
    }

    fn new_shard(&mut self, parent: Option<String>) -> Shard {
        self.next_shard += 1;
        Shard {
            id: format!("shardId-{:020}-{:08x}", self.next_shard, self.next_shard * 2654435761 % (1 << 32)),
            parent,
            start: self.next_seq + 1,
            end: None,
            records: Vec::new(),
        }
    }

    fn open_stream(&mut self, table: &str) {
        let shard = self.new_shard(None);
        let n = self.streams.len();
        let arn = format!("arn:aws:dynamodb:us-east-1:123456789012:table/{table}/stream/2026-11-30T00:00:{n:02}.000");
        self.streams.push(Stream { arn, enabled: true, shards: vec![shard] });
    }

    fn close_all(&mut self) {
        let last = self.next_seq;
        if let Some(s) = self.streams.last_mut() {
            for sh in s.shards.iter_mut().filter(|s| s.end.is_none()) {
                sh.end = Some(last);
            }
            s.enabled = false;
        }
    }

    fn record(&mut self, event: &'static str, key: String, image: Option<Value>) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64().floor());
        let hidden_polls = self.faults.hide_for_polls;
        let Some(stream) = self.current() else { return };
        let open: Vec<usize> = stream.shards.iter().enumerate().filter(|(_, s)| s.end.is_none()).map(|(i, _)| i).collect();
        if open.is_empty() {
            return;
        }
        // One key always goes to the same open shard, so its records stay in order.
        let h = key.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        let i = open[(h % open.len() as u64) as usize];
        stream.shards[i].records.push(Record { seq, event, key, image, at, written: Instant::now(), hidden_polls });
    }
}

/// The double; dropping it stops the server.
pub struct StreamsDouble {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StreamsDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct AppState {
    inner: Arc<Mutex<Inner>>,
    moto: SocketAddr,
    writes: Arc<tokio::sync::Mutex<()>>,
    table: String,
}

impl StreamsDouble {
    /// A double in front of moto at `moto_url` for `table`, with a stream enabled.
    pub async fn start(moto_url: &str, table: &str) -> Self {
        let moto: SocketAddr = moto_url.trim_start_matches("http://").trim_end_matches('/').parse().expect("moto address");
        let mut inner = Inner::default();
        inner.open_stream(table);
        let inner = Arc::new(Mutex::new(inner));
        let state = AppState { inner: inner.clone(), moto, writes: Arc::default(), table: table.to_owned() };
        let app = Router::new().route("/", post(handle)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, inner, task }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("double"))
    }

    /// Close every open shard and open two children of each.
    pub fn split(&self) {
        self.with(|i| {
            let last = i.next_seq;
            let Some(idx) = i.streams.iter().rposition(|s| s.enabled) else { return };
            let open: Vec<String> = i.streams[idx].shards.iter().filter(|s| s.end.is_none()).map(|s| s.id.clone()).collect();
            for id in open {
                let children = [i.new_shard(Some(id.clone())), i.new_shard(Some(id.clone()))];
                let s = &mut i.streams[idx];
                if let Some(sh) = s.shards.iter_mut().find(|s| s.id == id) {
                    sh.end = Some(last);
                }
                s.shards.extend(children);
            }
        });
    }

    /// Disable the stream (its shards close) and enable a new one with another ARN, as
    /// `UpdateTable` does when a stream is turned off and on; writes in between reach no stream.
    pub fn replace_stream(&self) {
        self.with(|i| {
            i.close_all();
            let table = self.table_name(i);
            i.open_stream(&table);
        });
    }

    /// Enable a new stream (another ARN) after [`Self::disable_stream`].
    pub fn enable_stream(&self) {
        self.with(|i| {
            let table = self.table_name(i);
            i.open_stream(&table);
        });
    }

    /// Make GetRecords on every shard open now answer empty pages until [`Self::unstall`].
    pub fn stall_open_shards(&self) {
        self.with(|i| {
            let open: Vec<String> =
                i.current().map(|s| s.shards.iter().filter(|s| s.end.is_none()).map(|s| s.id.clone()).collect()).unwrap_or_default();
            i.faults.stalled.extend(open);
        });
    }

    pub fn unstall(&self) {
        self.with(|i| i.faults.stalled.clear());
    }

    /// Disable the stream: DescribeTable shows none.
    pub fn disable_stream(&self) {
        self.with(Inner::close_all);
    }

    fn table_name(&self, i: &Inner) -> String {
        i.streams.first().and_then(|s| s.arn.split('/').nth(1)).unwrap_or("table").to_owned()
    }

    /// Expire every iterator issued so far.
    pub fn expire_iterators(&self) {
        self.with(|i| i.expired_before = Some(Instant::now()));
    }

    /// Arm faults.
    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        self.with(|i| f(&mut i.faults));
    }

    /// Calls received, by operation (`Scan`, `GetRecords`, ...).
    pub fn calls(&self, op: &str) -> u64 {
        self.with(|i| i.calls.get(op).copied().unwrap_or(0))
    }

    /// How many records of `lock_id` GetRecords has returned.
    pub fn served(&self, lock_id: &str) -> u64 {
        self.with(|i| i.served.get(lock_id).copied().unwrap_or(0))
    }

    /// Every operation received so far from requests signed with `access_key`.
    pub fn operations_by(&self, access_key: &str) -> std::collections::BTreeSet<String> {
        self.with(|i| i.by_key.get(access_key).cloned().unwrap_or_default())
    }

    /// The current stream's ARN.
    pub fn stream_arn(&self) -> Option<String> {
        self.with(|i| i.current().map(|s| s.arn.clone()))
    }

    /// Shards of the current stream that are open.
    pub fn open_shards(&self) -> usize {
        self.with(|i| i.current().map_or(0, |s| s.shards.iter().filter(|s| s.end.is_none()).count()))
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"__type": format!("com.amazonaws.dynamodb.v20120810#{kind}"), "message": message});
    (status, [("content-type", "application/x-amz-json-1.0")], body.to_string()).into_response()
}

fn ok(body: Value) -> Response {
    (StatusCode::OK, [("content-type", "application/x-amz-json-1.0")], body.to_string()).into_response()
}

async fn handle(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let op = target.rsplit('.').next().unwrap_or_default().to_owned();
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .unwrap_or("anonymous")
        .to_owned();
    {
        let mut inner = st.inner.lock().expect("double");
        *inner.calls.entry(op.clone()).or_default() += 1;
        inner.by_key.entry(key).or_default().insert(op.clone());
    }
    if let Some(op) = target.strip_prefix(STREAMS_PREFIX) {
        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        return streams_call(&st, op, &req);
    }
    if !target.starts_with(TABLE_PREFIX) {
        return error(StatusCode::BAD_REQUEST, "UnknownOperationException", "unknown operation");
    }
    if op == "Scan" && st.inner.lock().expect("double").faults.deny_scan {
        return error(StatusCode::BAD_REQUEST, "AccessDeniedException", "not authorized to perform: dynamodb:Scan");
    }
    let write = matches!(op.as_str(), "PutItem" | "DeleteItem" | "UpdateItem" | "BatchWriteItem");
    let _serial = if write { Some(st.writes.lock().await) } else { None };
    let (status, resp_headers, resp) = match forward(st.moto, &headers, &body).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", &format!("moto: {e}")),
    };
    let mut resp_body = resp;
    if status == 200 {
        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut inner = st.inner.lock().expect("double");
        match op.as_str() {
            "PutItem" => {
                if let Some(key) = req["Item"]["LockID"]["S"].as_str() {
                    inner.record("INSERT", key.to_owned(), Some(req["Item"].clone()));
                }
            }
            "DeleteItem" => {
                if let Some(key) = req["Key"]["LockID"]["S"].as_str() {
                    inner.record("REMOVE", key.to_owned(), None);
                }
            }
            "DescribeTable" => {
                if let Ok(mut v) = serde_json::from_slice::<Value>(&resp_body) {
                    let current = inner.current().map(|s| s.arn.clone());
                    let t = &mut v["Table"];
                    if let Some(obj) = t.as_object_mut() {
                        obj.remove("LatestStreamArn");
                        obj.remove("LatestStreamLabel");
                        match &current {
                            Some(arn) => {
                                obj.insert("StreamSpecification".into(), json!({"StreamEnabled": true, "StreamViewType": "NEW_IMAGE"}));
                                obj.insert("LatestStreamArn".into(), json!(arn));
                                obj.insert("LatestStreamLabel".into(), json!(arn.rsplit('/').next()));
                            }
                            None => {
                                obj.remove("StreamSpecification");
                            }
                        }
                    }
                    resp_body = v.to_string().into_bytes();
                }
            }
            "UpdateItem" | "BatchWriteItem" => panic!("the streams double does not turn {op} into stream records"),
            _ => {}
        }
    }
    let mut r = (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), resp_body).into_response();
    for (k, v) in resp_headers {
        if let (Ok(k), Ok(v)) = (axum::http::HeaderName::try_from(k.as_str()), axum::http::HeaderValue::try_from(v.as_str())) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

fn streams_call(st: &AppState, op: &str, req: &Value) -> Response {
    let mut inner = st.inner.lock().expect("double");
    if inner.faults.deny {
        return error(StatusCode::BAD_REQUEST, "AccessDeniedException", &format!("not authorized to perform: dynamodb:{op}"));
    }
    match op {
        "DescribeStream" => {
            let arn = req["StreamArn"].as_str().unwrap_or_default();
            let Some(s) = inner.streams.iter().find(|s| s.arn == arn) else {
                return error(StatusCode::BAD_REQUEST, "ResourceNotFoundException", "Requested resource not found");
            };
            let shards: Vec<Value> = s
                .shards
                .iter()
                .map(|sh| {
                    let mut range = json!({"StartingSequenceNumber": format!("{:021}", sh.start)});
                    if let Some(end) = sh.end {
                        range["EndingSequenceNumber"] = json!(format!("{:021}", end.max(sh.start)));
                    }
                    let mut v = json!({"ShardId": sh.id, "SequenceNumberRange": range});
                    if let Some(p) = &sh.parent {
                        v["ParentShardId"] = json!(p);
                    }
                    v
                })
                .collect();
            ok(json!({"StreamDescription": {
                "StreamArn": s.arn, "StreamLabel": s.arn.rsplit('/').next(),
                "StreamStatus": if s.enabled { "ENABLED" } else { "DISABLED" },
                "StreamViewType": "NEW_IMAGE", "TableName": st.table,
                "KeySchema": [{"AttributeName": "LockID", "KeyType": "HASH"}],
                "Shards": shards,
            }}))
        }
        "GetShardIterator" => {
            let arn = req["StreamArn"].as_str().unwrap_or_default().to_owned();
            let shard_id = req["ShardId"].as_str().unwrap_or_default().to_owned();
            let Some(shard) = inner.streams.iter().find(|s| s.arn == arn).and_then(|s| s.shards.iter().find(|sh| sh.id == shard_id)) else {
                return error(StatusCode::BAD_REQUEST, "ResourceNotFoundException", "Requested resource not found");
            };
            let seq = req["SequenceNumber"].as_str().and_then(|s| s.parse::<u64>().ok());
            let pos = match req["ShardIteratorType"].as_str() {
                Some("TRIM_HORIZON") => 0,
                Some("LATEST") => shard.records.len(),
                Some("AT_SEQUENCE_NUMBER") => shard.records.iter().position(|r| Some(r.seq) >= seq).unwrap_or(shard.records.len()),
                Some("AFTER_SEQUENCE_NUMBER") => shard.records.iter().position(|r| Some(r.seq) > seq).unwrap_or(shard.records.len()),
                _ => return error(StatusCode::BAD_REQUEST, "ValidationException", "bad ShardIteratorType"),
            };
            let token = issue(&mut inner, arn, shard_id, pos);
            ok(json!({"ShardIterator": token}))
        }
        "GetRecords" => {
            let token = req["ShardIterator"].as_str().unwrap_or_default();
            let Some((arn, shard_id, pos, issued)) = inner.iterators.get(token).cloned() else {
                return error(StatusCode::BAD_REQUEST, "ValidationException", "Invalid ShardIterator");
            };
            if inner.expired_before.is_some_and(|t| issued <= t) {
                return error(StatusCode::BAD_REQUEST, "ExpiredIteratorException", "Iterator expired");
            }
            if inner.faults.throttle_all || inner.faults.throttle_next > 0 {
                inner.faults.throttle_next = inner.faults.throttle_next.saturating_sub(1);
                return error(StatusCode::BAD_REQUEST, "LimitExceededException", "Too many requests for this shard");
            }
            let limit = req["Limit"].as_u64().unwrap_or(1000).min(1000) as usize;
            let propagation = inner.faults.propagation;
            let frozen = inner.faults.empty_next > 0 || inner.faults.stalled.contains(&shard_id);
            let Some(shard) =
                inner.streams.iter_mut().find(|s| s.arn == arn).and_then(|s| s.shards.iter_mut().find(|sh| sh.id == shard_id))
            else {
                return error(StatusCode::BAD_REQUEST, "ResourceNotFoundException", "Requested resource not found");
            };
            let (page, next) = if frozen {
                (Vec::new(), pos)
            } else {
                // The page ends before the first record not readable yet; that record is then
                // left out of one page fewer.
                let readable = shard.records[pos.min(shard.records.len())..]
                    .iter()
                    .take(limit)
                    .take_while(|r| r.hidden_polls == 0 && r.written.elapsed() >= propagation)
                    .count();
                if let Some(r) = shard.records.get_mut(pos + readable).filter(|_| readable < limit) {
                    r.hidden_polls = r.hidden_polls.saturating_sub(1);
                }
                let page: Vec<Record> = shard.records[pos.min(shard.records.len())..].iter().take(readable).cloned().collect();
                (page, pos + readable)
            };
            let Some(shard) = inner.streams.iter().find(|s| s.arn == arn).and_then(|s| s.shards.iter().find(|sh| sh.id == shard_id)) else {
                return error(StatusCode::BAD_REQUEST, "ResourceNotFoundException", "Requested resource not found");
            };
            let closed_and_done = shard.end.is_some() && next >= shard.records.len();
            inner.faults.empty_next = inner.faults.empty_next.saturating_sub(1);
            for r in &page {
                *inner.served.entry(r.key.clone()).or_default() += 1;
            }
            let records: Vec<Value> = page
                .iter()
                .map(|r| {
                    let mut d = json!({"ApproximateCreationDateTime": r.at, "Keys": {"LockID": {"S": r.key}},
                        "SequenceNumber": format!("{:021}", r.seq), "SizeBytes": 64, "StreamViewType": "NEW_IMAGE"});
                    if let Some(img) = &r.image {
                        d["NewImage"] = img.clone();
                    }
                    json!({"eventID": format!("e{}", r.seq), "eventName": r.event, "eventVersion": "1.1",
                        "eventSource": "aws:dynamodb", "awsRegion": "us-east-1", "dynamodb": d})
                })
                .collect();
            let mut out = json!({"Records": records});
            if !closed_and_done {
                out["NextShardIterator"] = json!(issue(&mut inner, arn, shard_id, next));
            }
            ok(out)
        }
        _ => error(StatusCode::BAD_REQUEST, "UnknownOperationException", "unknown operation"),
    }
}

fn issue(inner: &mut Inner, arn: String, shard: String, pos: usize) -> String {
    inner.next_iterator += 1;
    let token = format!("it-{:012}", inner.next_iterator);
    inner.iterators.insert(token.clone(), (arn, shard, pos, Instant::now()));
    token
}

/// Send the request to moto as it came (moto does not check signatures) and return its answer.
async fn forward(moto: SocketAddr, headers: &HeaderMap, body: &[u8]) -> std::io::Result<(u16, Vec<(String, String)>, Vec<u8>)> {
    let mut conn = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(moto)).await??;
    let mut head = format!("POST / HTTP/1.1\r\nHost: {moto}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        let name = k.as_str();
        if matches!(name, "host" | "connection" | "content-length" | "transfer-encoding") {
            continue;
        }
        if let Ok(v) = v.to_str() {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(502);
    let mut out = Vec::new();
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "transfer-encoding" && v.trim().eq_ignore_ascii_case("chunked") {
                chunked = true;
                continue;
            }
            if matches!(k.as_str(), "content-length" | "connection" | "date" | "server") {
                continue;
            }
            out.push((k, v.trim().to_owned()));
        }
    }
    if chunked {
        body = dechunk(&body);
    }
    Ok((status, out, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}
