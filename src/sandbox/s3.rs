//! A minimal in-memory S3 for the sandbox: path-style buckets and objects, just what Terraform's
//! S3 backend does with its state (list the workspace prefix, HEAD, GET with or without a range,
//! PUT, including the SDK's `aws-chunked` uploads, DELETE), and the conditional writes lock files
//! need: `If-None-Match: *` on PUT (how Terraform 1.11+ takes a lock file) and `If-Match: <ETag>`
//! on PUT and DELETE (how statelock releases one exactly), each checked and applied atomically.
//! Every bucket exists. Signatures are not checked.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const MAX_OBJECT_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone)]
struct Object {
    data: Bytes,
    etag: String,
    modified: Timestamp,
}

/// The objects, by bucket and key.
#[derive(Clone, Default)]
pub struct MemoryS3 {
    objects: Arc<Mutex<BTreeMap<(String, String), Object>>>,
}

impl MemoryS3 {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Object>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serve until `shutdown`.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        let app = Router::new().fallback(handle).with_state(self);
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message><RequestId>sandbox</RequestId></Error>",
        xml_escape(message)
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 3 <= b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find(|(k, _)| *k == name).map(|(_, v)| percent_decode(v))
}

/// The payload of an `aws-chunked` body: `<hex size>[;ext]\r\n<data>\r\n` repeated, ending with
/// a zero-size chunk and optional trailers.
fn decode_aws_chunked(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if rest.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn is_chunked(headers: &HeaderMap) -> bool {
    let has = |name: &str, needle: &str| headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(needle));
    has("content-encoding", "aws-chunked") || has("x-amz-content-sha256", "STREAMING-")
}

fn etag(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

fn http_date(t: Timestamp) -> String {
    t.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

async fn handle(State(s3): State<MemoryS3>, req: Request) -> Response {
    let method = req.method().clone();
    let path = percent_decode(req.uri().path());
    let query = req.uri().query().unwrap_or_default().to_owned();
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), MAX_OBJECT_BYTES).await {
        Ok(b) => b,
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "EntityTooLarge", "the sandbox S3 keeps objects up to 64 MiB"),
    };
    let trimmed = path.trim_start_matches('/');
    let (bucket, key) = match trimmed.split_once('/') {
        Some((b, k)) => (b.to_owned(), k.to_owned()),
        None => (trimmed.to_owned(), String::new()),
    };
    if bucket.is_empty() {
        return error(StatusCode::BAD_REQUEST, "InvalidRequest", "the sandbox S3 answers path-style requests only (use_path_style = true)");
    }
    match (method, key.is_empty()) {
        (Method::GET, true) => list(&s3, &bucket, &query),
        (Method::HEAD | Method::PUT, true) => StatusCode::OK.into_response(),
        // HEAD is answered like GET; hyper leaves the body out.
        (Method::HEAD, false) | (Method::GET, false) => get(&s3, &bucket, &key, &headers),
        (Method::PUT, false) => {
            let data = if is_chunked(&headers) {
                match decode_aws_chunked(&body) {
                    Some(d) => Bytes::from(d),
                    None => return error(StatusCode::BAD_REQUEST, "IncompleteBody", "malformed aws-chunked body"),
                }
            } else {
                body
            };
            let object = Object { etag: etag(&data), data, modified: Timestamp::now() };
            let tag = object.etag.clone();
            {
                let mut objects = s3.lock();
                let current = objects.get(&(bucket.clone(), key.clone())).map(|o| o.etag.as_str());
                if let Some(refusal) = precondition(&headers, current, true) {
                    return refusal;
                }
                objects.insert((bucket, key), object);
            }
            let mut r = StatusCode::OK.into_response();
            if let Ok(v) = HeaderValue::from_str(&tag) {
                r.headers_mut().insert(header::ETAG, v);
            }
            r
        }
        (Method::DELETE, false) => {
            let mut objects = s3.lock();
            let current = objects.get(&(bucket.clone(), key.clone())).map(|o| o.etag.as_str());
            if let Some(refusal) = precondition(&headers, current, false) {
                return refusal;
            }
            objects.remove(&(bucket, key));
            StatusCode::NO_CONTENT.into_response()
        }
        (m, _) => error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &format!("the sandbox S3 does not support {m} here")),
    }
}

/// The answer to a write whose `If-None-Match` / `If-Match` does not hold for the object's
/// current ETag (`None`: no object), as S3 gives it; `None` when the write may go ahead.
fn precondition(headers: &HeaderMap, current: Option<&str>, is_put: bool) -> Option<Response> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let failed =
        || error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold");
    if is_put && header("if-none-match") == Some("*") && current.is_some() {
        return Some(failed());
    }
    if let Some(wanted) = header("if-match") {
        let Some(current) = current else {
            return Some(error(StatusCode::NOT_FOUND, "NoSuchKey", "The specified key does not exist."));
        };
        let unquote = |t: &str| t.trim_matches('"').to_owned();
        if wanted != "*" && unquote(wanted) != unquote(current) {
            return Some(failed());
        }
    }
    None
}

fn get(s3: &MemoryS3, bucket: &str, key: &str, headers: &HeaderMap) -> Response {
    let Some(obj) = s3.lock().get(&(bucket.to_owned(), key.to_owned())).cloned() else {
        return error(StatusCode::NOT_FOUND, "NoSuchKey", "The specified key does not exist.");
    };
    let total = obj.data.len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|r| r.strip_prefix("bytes=")).and_then(|r| {
        let (a, b) = r.split_once('-')?;
        let start: usize = a.parse().ok()?;
        let end: usize = if b.is_empty() { total.saturating_sub(1) } else { b.parse().ok()? };
        (start <= end && start < total.max(1)).then_some((start, end.min(total.saturating_sub(1))))
    });
    let (status, data, content_range) = match range {
        Some((a, b)) if total > 0 => (StatusCode::PARTIAL_CONTENT, obj.data.slice(a..=b), Some(format!("bytes {a}-{b}/{total}"))),
        _ => (StatusCode::OK, obj.data.clone(), None),
    };
    let mut r = (status, data).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&obj.etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(obj.modified)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::CONTENT_RANGE, cr);
    }
    r
}

fn list(s3: &MemoryS3, bucket: &str, query: &str) -> Response {
    let prefix = query_param(query, "prefix").unwrap_or_default();
    let v2 = query_param(query, "list-type").as_deref() == Some("2");
    let objects = s3.lock();
    let mut contents = String::new();
    let mut count = 0;
    for ((b, k), o) in objects.iter() {
        if b != bucket || !k.starts_with(&prefix) {
            continue;
        }
        count += 1;
        contents.push_str(&format!(
            "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            xml_escape(k),
            o.modified.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            xml_escape(&o.etag),
            o.data.len()
        ));
    }
    let key_count = if v2 { format!("<KeyCount>{count}</KeyCount>") } else { String::new() };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>{}</Name><Prefix>{}</Prefix>{key_count}<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}</ListBucketResult>",
        xml_escape(bucket),
        xml_escape(&prefix)
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_chunked_bodies_decode_with_and_without_signatures_and_trailers() {
        let signed = b"5;chunk-signature=abc\r\nhello\r\n6;chunk-signature=def\r\n world\r\n0;chunk-signature=0\r\n\r\n";
        assert_eq!(decode_aws_chunked(signed).as_deref(), Some(&b"hello world"[..]));
        let trailer = b"3\r\n{}\n\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n";
        assert_eq!(decode_aws_chunked(trailer).as_deref(), Some(&b"{}\n"[..]));
        assert_eq!(decode_aws_chunked(b"zz\r\nno"), None);
        assert_eq!(decode_aws_chunked(b"5\r\nab"), None);
    }

    #[test]
    fn conditional_writes_hold_as_s3_answers_them() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        let status = |r: Option<Response>| r.map(|r| r.status().as_u16());
        // Taking a lock file: only when there is none.
        assert_eq!(status(precondition(&h(&[("if-none-match", "*")]), None, true)), None);
        assert_eq!(status(precondition(&h(&[("if-none-match", "*")]), Some("\"a\""), true)), Some(412));
        // Releasing exactly: the ETag judged, quoted or not; another ETag or no object refuses.
        assert_eq!(status(precondition(&h(&[("if-match", "\"a\"")]), Some("\"a\""), false)), None);
        assert_eq!(status(precondition(&h(&[("if-match", "a")]), Some("\"a\""), false)), None);
        assert_eq!(status(precondition(&h(&[("if-match", "\"a\"")]), Some("\"b\""), false)), Some(412));
        assert_eq!(status(precondition(&h(&[("if-match", "\"a\"")]), None, false)), Some(404));
        // Unconditional writes (Terraform's own release) always go ahead.
        assert_eq!(status(precondition(&h(&[]), Some("\"a\""), false)), None);
    }

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(query_param("list-type=2&prefix=env%3A%2F", "prefix").as_deref(), Some("env:/"));
        assert_eq!(query_param("x-id=GetObject", "prefix"), None);
        assert_eq!(percent_decode("/tfstate/demo/terraform.tfstate"), "/tfstate/demo/terraform.tfstate");
    }
}
