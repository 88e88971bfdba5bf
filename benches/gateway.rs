//! Gateway benchmarks, printed as figures (nothing here asserts a speed):
//!
//! 1. Added latency: the same consistent GetItem (Terraform's digest read) sent 3,000 times
//!    straight to moto and 3,000 times through the gateway (forwarding to that moto), alternating,
//!    one client: p50 and p99 of each, their difference, and the paired difference per call.
//! 2. Throughput: lock/unlock pairs per second with 32 concurrent keep-alive clients against the
//!    in-memory backend (a conditional PutItem then a DeleteItem per pair, each client on its own
//!    state), for 5 s, with the gateway's Kubernetes side effects on; also how many API writes
//!    those side effects cost once coalesced.
//!
//! Run: `cargo bench --bench gateway` (needs moto in .venv: bash .ci/install).

mod common;

use std::{
    io::{Read, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aws_sdk_dynamodb::types::AttributeValue;
use common::{create_table, db, gateway, moto, percentile, rig};
use serde_json::json;
use statelock::gateway::{memory::MemoryTables, server::Backend};

async fn get_latencies(client: &aws_sdk_dynamodb::Client, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client
            .get_item()
            .table_name("tf-locks")
            .key("LockID", AttributeValue::S("tfstate/app/terraform.tfstate-md5".into()))
            .consistent_read(true)
            .projection_expression("LockID, Digest")
            .send()
            .await
            .expect("get");
        out.push(t.elapsed());
    }
    out.sort();
    out
}

/// One keep-alive HTTP/1.1 connection speaking just enough of the protocol.
struct Conn {
    s: std::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn call(&mut self, target: &str, body: &str) -> u16 {
        write!(self.s, "POST / HTTP/1.1\r\nHost: gw\r\nX-Amz-Target: DynamoDB_20120810.{target}\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()).expect("write");
        // Read the head, then exactly Content-Length bytes.
        self.buf.clear();
        let mut byte = [0u8; 1024];
        loop {
            let n = self.s.read(&mut byte).expect("read");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&byte[..n]);
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                let len: usize =
                    head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.s.read(&mut byte).expect("read body");
                    self.buf.extend_from_slice(&byte[..n]);
                }
                return head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let m = moto();
    let direct = db(&m.url).await;
    create_table(&direct, "tf-locks", false).await;
    direct
        .put_item()
        .table_name("tf-locks")
        .item("LockID", AttributeValue::S("tfstate/app/terraform.tfstate-md5".into()))
        .item("Digest", AttributeValue::S("d41d8cd98f00b204e9800998ecf8427e".into()))
        .send()
        .await
        .expect("digest");
    let r = rig(&m.url, "tf-locks", json!({"gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}})).await;

    // 1. Added latency (forwarding to moto): direct and gateway calls alternate, so both see the
    // same moto at the same moment; the paired difference is the gateway's own cost.
    let fwd = gateway(&r, Backend::Forward).await;
    let via = db(&format!("http://{fwd}")).await;
    let _ = get_latencies(&direct, 200).await; // warm up both paths
    let _ = get_latencies(&via, 200).await;
    let (mut d, mut g, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3000 {
        let a = get_latencies(&direct, 1).await[0];
        let b = get_latencies(&via, 1).await[0];
        d.push(a);
        g.push(b);
        diff.push(b.as_secs_f64() - a.as_secs_f64());
    }
    d.sort();
    g.sort();
    diff.sort_by(f64::total_cmp);
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    let pct = |v: &[f64], p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize] * 1000.0;
    println!("statelock gateway benchmarks (2 cores, moto 5.2.5, gateway in-process)");
    println!("consistent GetItem, 3,000 calls each, one client, direct and gateway calls alternating:");
    println!("  direct to moto:      p50 {:>6.2} ms   p99 {:>6.2} ms", ms(percentile(&d, 0.5)), ms(percentile(&d, 0.99)));
    println!("  through the gateway: p50 {:>6.2} ms   p99 {:>6.2} ms", ms(percentile(&g, 0.5)), ms(percentile(&g, 0.99)));
    println!(
        "  added (gateway percentile minus direct percentile): p50 {:>6.2} ms   p99 {:>6.2} ms",
        ms(percentile(&g, 0.5)) - ms(percentile(&d, 0.5)),
        ms(percentile(&g, 0.99)) - ms(percentile(&d, 0.99))
    );
    println!(
        "  paired differences (each gateway call minus the direct call before it; moto jitter counts twice): p50 {:>6.2} ms   p99 {:>6.2} ms",
        pct(&diff, 0.5),
        pct(&diff, 0.99)
    );

    // 2. Throughput against the in-memory backend.
    let mem = gateway(&r, Backend::Memory(Arc::new(MemoryTables::default()))).await;
    let pairs = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writes_before = r.emulator.total_writes();
    let threads: Vec<_> = (0..32)
        .map(|w| {
            let (pairs, stop) = (pairs.clone(), stop.clone());
            std::thread::spawn(move || {
                let s = std::net::TcpStream::connect(mem).expect("connect");
                s.set_nodelay(true).expect("nodelay");
                let mut c = Conn { s, buf: Vec::with_capacity(4096) };
                let id = format!("tfstate/w{w}/terraform.tfstate");
                let info = json!({"ID": format!("id-{w}"), "Operation": "OperationTypePlan", "Info": "", "Who": "root@runner", "Version": "1.11.4", "Created": "2026-11-26T13:00:00Z", "Path": id}).to_string();
                let put = json!({"ConditionExpression": "attribute_not_exists(LockID)", "Item": {"LockID": {"S": id}, "Info": {"S": info}}, "TableName": "tf-locks"}).to_string();
                let del = json!({"Key": {"LockID": {"S": id}}, "TableName": "tf-locks"}).to_string();
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(c.call("PutItem", &put), 200);
                    assert_eq!(c.call("DeleteItem", &del), 200);
                    pairs.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    let done = pairs.load(Ordering::Relaxed);
    for th in threads {
        th.join().expect("client");
    }
    // Let the queued StateLock updates finish, then count what they cost the API server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = r.emulator.total_writes() - writes_before;
    println!("lock/unlock pairs through the gateway, in-memory backend, 32 keep-alive clients, 5 s:");
    println!("  {:>8.0} pairs/s ({done} pairs)", done as f64 / elapsed);
    println!(
        "  Kubernetes writes for them (StateLocks, status, events; coalesced per lock): {writes} ({:.4} per grant or release)",
        writes as f64 / (2 * done.max(1)) as f64
    );
    r.cancel.cancel();
}
