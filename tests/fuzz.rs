//! Fuzzing of every parser that reads outside input, property-based with generators that aim at
//! structure (coverage-guided fuzzing needs a nightly toolchain and clang, which these machines do
//! not have). Each target runs for a time budget: a short one in CI, and
//! `STATELOCK_FUZZ_SECONDS=600 cargo test --release --test fuzz -- --nocapture --test-threads 1`
//! for ten minutes each. The rule for every target: no panic, no hang, no dropped connection; an
//! error answer every time.

mod common;

use std::{
    io::{Read, Write},
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use common::TestCluster;
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, TestRunner},
};
use serde_json::{Value, json};

fn budget() -> Duration {
    Duration::from_secs(std::env::var("STATELOCK_FUZZ_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3))
}

/// Run `check` on generated values until the time budget is spent; any panic or `Err` fails the
/// target and prints the input.
fn fuzz<S: Strategy>(name: &str, strategy: S, mut check: impl FnMut(&S::Value) -> Result<(), String>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
    let deadline = Instant::now() + budget();
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let value = strategy.new_tree(&mut runner).expect("a value").current();
        match std::panic::catch_unwind(AssertUnwindSafe(|| check(&value))) {
            Ok(Ok(())) => cases += 1,
            Ok(Err(e)) => panic!("fuzz target {name}: {e}\ninput: {value:?}"),
            Err(_) => panic!("fuzz target {name}: panicked on input: {value:?}"),
        }
    }
    println!("fuzz target {name}: {cases} cases in {:.0} s, no failure", budget().as_secs_f64());
    assert!(cases > 0, "fuzz target {name} ran no case");
}

/// Strings where parsers slip: empty, huge, control characters, Unicode, near-misses of the real
/// tokens.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-zA-Z0-9:/._@#= -]{0,40}",
        any::<String>(),
        "\\PC{0,20}",
        Just("attribute_not_exists(LockID)".to_owned()),
        Just("#info = :info".to_owned()),
        Just("root@atlantis-0".to_owned()),
        Just("2026-11-26T13:00:23.486227413Z".to_owned()),
        Just("99999999999999999999h".to_owned()),
        Just("x".repeat(70_000)),
        Just("\u{0}\u{1b}[31m\u{202e}".to_owned()),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("S".to_owned()),
                    Just("N".to_owned()),
                    Just("B".to_owned()),
                    Just("M".to_owned()),
                    Just("L".to_owned()),
                    Just("LockID".to_owned()),
                    Just("Info".to_owned()),
                    Just("Digest".to_owned()),
                    "[a-zA-Z]{1,8}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A DynamoDB request body built from the pieces of the real ones, recombined.
fn dynamodb_body() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just(json!({"LockID": {"S": "tfstate/app/terraform.tfstate"}})),
        Just(json!({"LockID": {"S": "tfstate/app/terraform.tfstate-md5"}})),
        json_value().prop_map(|v| json!({"LockID": v})),
        json_value(),
    ];
    let item = prop_oneof![
        Just(
            json!({"LockID": {"S": "tfstate/app/terraform.tfstate"}, "Info": {"S": common::terraform_info("1", "root@atlantis-0", "tfstate/app/terraform.tfstate", "2026-11-26T13:00:23Z")}})
        ),
        Just(json!({"LockID": {"S": "tfstate/app/terraform.tfstate-md5"}, "Digest": {"S": "abc"}})),
        json_value(),
    ];
    let condition = prop_oneof![
        Just(None),
        Just(Some("attribute_not_exists(LockID)".to_owned())),
        Just(Some("#info = :info".to_owned())),
        hostile_string().prop_map(Some),
        proptest::collection::vec(
            prop_oneof![
                Just("attribute_not_exists("),
                Just("LockID"),
                Just(")"),
                Just(" AND "),
                Just(" OR "),
                Just("="),
                Just(":i"),
                Just("#n"),
                Just("NOT ")
            ],
            0..6
        )
        .prop_map(|t| Some(t.concat())),
    ];
    (
        prop_oneof![Just(json!("tf-locks")), json_value()],
        proptest::option::of(key),
        proptest::option::of(item),
        condition,
        proptest::option::of(json_value()),
        proptest::option::of(json_value()),
        proptest::option::of(prop_oneof![Just(json!("LockID, Info")), json_value()]),
        proptest::option::of(json_value()),
    )
        .prop_map(|(table, key, item, cond, names, values, projection, extra)| {
            let mut m = serde_json::Map::new();
            m.insert("TableName".into(), table);
            if let Some(k) = key {
                m.insert("Key".into(), k);
            }
            if let Some(i) = item {
                m.insert("Item".into(), i);
            }
            if let Some(c) = cond {
                m.insert("ConditionExpression".into(), json!(c));
            }
            if let Some(n) = names {
                m.insert("ExpressionAttributeNames".into(), n);
            }
            if let Some(v) = values {
                m.insert("ExpressionAttributeValues".into(), v);
            }
            if let Some(p) = projection {
                m.insert("ProjectionExpression".into(), p);
            }
            if let Some(x) = extra {
                m.insert("Expected".into(), x);
            }
            Value::Object(m)
        })
}

fn target_header() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("DynamoDB_20120810.PutItem".to_owned()),
        Just("DynamoDB_20120810.GetItem".to_owned()),
        Just("DynamoDB_20120810.DeleteItem".to_owned()),
        Just("DynamoDB_20120810.Scan".to_owned()),
        Just("DynamoDB_20120810.DescribeTable".to_owned()),
        Just("DynamoDB_20120810.Query".to_owned()),
        "[ -~]{0,40}",
    ]
}

#[test]
fn fuzz_gateway_request_parsing() {
    use statelock::gateway::protocol;
    fuzz(
        "gateway request bodies",
        (
            target_header(),
            prop_oneof![dynamodb_body().prop_map(|v| v.to_string().into_bytes()), proptest::collection::vec(any::<u8>(), 0..256)],
        ),
        |(target, body)| {
            if let Err(e) = protocol::parse(target, body)
                && !(400..500).contains(&e.status)
            {
                return Err(format!("a malformed request must be a 4xx, got {e:?}"));
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_lock_items_and_info() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use statelock::dynamo::lock_item::{TableItem, parse_item};
    let info = prop_oneof![
        hostile_string(),
        json_value().prop_map(|v| v.to_string()),
        (hostile_string(), hostile_string(), hostile_string(), json_value())
            .prop_map(|(id, who, created, op)| json!({"ID": id, "Operation": op, "Who": who, "Created": created, "Path": "p"}).to_string()),
    ];
    let attr = prop_oneof![
        info.prop_map(AttributeValue::S),
        hostile_string().prop_map(AttributeValue::N),
        any::<bool>().prop_map(AttributeValue::Bool),
        Just(AttributeValue::Null(true)),
        proptest::collection::vec(hostile_string(), 0..3).prop_map(AttributeValue::Ss),
    ];
    fuzz(
        "lock items",
        (
            proptest::option::of(prop_oneof![hostile_string().prop_map(AttributeValue::S), Just(AttributeValue::N("1".into()))]),
            proptest::option::of(attr),
        ),
        |(lock_id, info)| {
            let mut item = std::collections::HashMap::new();
            if let Some(l) = lock_id {
                item.insert("LockID".to_owned(), l.clone());
            }
            if let Some(i) = info {
                item.insert("Info".to_owned(), i.clone());
            }
            if let TableItem::Lock(r) = parse_item(&item) {
                // What a StateLock keeps is bounded, whatever the input.
                for f in [&r.info.id, &r.info.who, &r.info.operation, &r.info.path] {
                    if f.as_ref().is_some_and(|s| s.len() > statelock::lock_record::MAX_FIELD_BYTES) {
                        return Err("an Info field longer than the cap was kept".into());
                    }
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_lock_source_specs() {
    use statelock::{crd::LockSourceSpec, tenancy::TenancyPolicy};
    let duration = prop_oneof![hostile_string(), "[0-9]{1,25}(ns|us|µs|ms|s|m|h)", "([0-9]{1,4}(\\.[0-9]{1,12})?(h|m|s)){1,4}"];
    let spec = (
        duration.clone(),
        duration.clone(),
        duration.clone(),
        duration,
        proptest::option::of(hostile_string()),
        proptest::collection::vec(hostile_string(), 0..3),
        proptest::option::of(hostile_string()),
        json_value(),
    )
        .prop_map(|(grace, stale, skew, interval, pattern, namespaces, endpoint, junk)| {
            json!({
                "dynamodb": {"tableName": "tf-locks", "region": "us-east-1", "endpoint": endpoint},
                "sync": {"mode": "Scan", "interval": interval},
                "holders": {"namespaces": namespaces, "hostnamePattern": pattern},
                "expiry": {"mode": "Release", "gracePeriod": grace, "staleAfter": stale, "skewTolerance": skew},
                "gateway": {"allowedSourceRanges": [junk]},
            })
        });
    let policy = TenancyPolicy { identity_namespaces: vec!["*".into()], allowed_endpoints: vec!["http://127.0.0.1:*".into()] };
    fuzz("LockSource specs", spec, |v| {
        if let Ok(spec) = serde_json::from_value::<LockSourceSpec>(v.clone()) {
            let problems = spec.problems();
            let mut source = statelock::crd::LockSource::new("s", spec);
            source.metadata.namespace = Some("ns".into());
            let _ = source.spec.holders.compiled_pattern();
            let _ = source.spec.holders.resolved_namespaces("ns");
            if policy.check(&source).is_ok() && !problems.is_empty() {
                return Err(format!("a LockSource with problems was served: {problems:?}"));
            }
            if problems.is_empty() && source.spec.expiry.grace_period.get() > statelock::crd::MAX_GRACE_PERIOD {
                return Err("an unbounded grace period passed".into());
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_label_and_field_selectors() {
    use apiserver_emulator::selectors::LabelSelector;
    let token = prop_oneof![
        Just("a"),
        Just("="),
        Just("=="),
        Just("!="),
        Just(","),
        Just(" in "),
        Just(" notin "),
        Just("("),
        Just(")"),
        Just("!"),
        Just("x/y"),
        Just(" "),
        Just("é")
    ];
    fuzz("label selectors", prop_oneof![proptest::collection::vec(token, 0..12).prop_map(|t| t.concat()), hostile_string()], |s| {
        let _ = LabelSelector::parse(s);
        Ok(())
    });
}

/// One raw HTTP exchange; `None` when the server dropped the connection without an answer.
fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    s.write_all(request).ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok())
}

/// A request to the emulator: real paths and parameters, and near-misses, with bodies of every kind.
fn emulator_request() -> impl Strategy<Value = (&'static str, String, String, &'static str, Vec<u8>)> {
    let method = prop_oneof![1 => Just("GET"), 2 => Just("POST"), 2 => Just("PUT"), 4 => Just("PATCH"), 1 => Just("DELETE")];
    let path = prop_oneof![
        Just("/api/v1/namespaces/ns/pods".to_owned()),
        Just("/api/v1/namespaces/ns/pods/p".to_owned()),
        Just("/api/v1/namespaces/ns/pods/p/status".to_owned()),
        Just("/api/v1/namespaces/ns/configmaps/c".to_owned()),
        Just("/api/v1/namespaces/ns/configmaps/c".to_owned()),
        Just("/apis/statelock.dev/v1alpha1/namespaces/ns/statelocks/s".to_owned()),
        Just("/apis/statelock.dev/v1alpha1/namespaces/ns/statelocks/s/status".to_owned()),
        Just("/apis/statelock.dev/v1alpha1/statelocks".to_owned()),
        Just("/api/v1/pods".to_owned()),
        Just("/apis".to_owned()),
        "/[a-z0-9/._-]{0,40}",
    ];
    let query = prop_oneof![
        Just(String::new()),
        Just(String::new()),
        Just(String::new()),
        Just("?watch=true&timeoutSeconds=1".to_owned()),
        Just("?labelSelector=a%3Db".to_owned()),
        Just("?fieldSelector=metadata.name%3Dp".to_owned()),
        Just("?limit=1&continue=garbage".to_owned()),
        Just("?resourceVersion=999999999&watch=1&timeoutSeconds=1".to_owned()),
        Just("?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1".to_owned()),
        Just("?fieldManager=x&force=true".to_owned()),
        "\\?[a-zA-Z=&%0-9]{0,30}",
    ];
    let content_type = prop_oneof![
        Just("application/json"),
        Just("application/merge-patch+json"),
        Just("application/json-patch+json"),
        Just("application/strategic-merge-patch+json"),
        Just("application/apply-patch+yaml"),
        Just("application/vnd.kubernetes.protobuf"),
        Just("text/plain"),
    ];
    let body = prop_oneof![
        json_value().prop_map(|v| v.to_string().into_bytes()),
        Just(br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec()),
        Just(br#"[{"op":"add","path":"/metadata/labels","value":{"a":"b"}}]"#.to_vec()),
        Just(b"[]".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..128),
    ];
    (method, path, query, content_type, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzz_the_emulators_request_handling() {
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace("ns").await;
    let addr = cluster.emulator.addr;
    // Objects for the requests to find (patches of an existing object reach the patch code).
    let seed = move |path: &str, body: &str| {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        exchange(addr, req.as_bytes())
    };
    let seeded = tokio::task::spawn_blocking(move || {
        [
            seed("/api/v1/namespaces/ns/pods", r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#),
            seed("/api/v1/namespaces/ns/configmaps", r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"a":"b"}}"#),
            seed(
                "/apis/statelock.dev/v1alpha1/namespaces/ns/statelocks",
                r#"{"apiVersion":"statelock.dev/v1alpha1","kind":"StateLock","metadata":{"name":"s"},"spec":{"source":"x","lockId":"b/k"}}"#,
            ),
        ]
    })
    .await
    .expect("seed");
    assert_eq!(seeded, [Some(201), Some(201), Some(201)], "objects to patch");
    tokio::task::spawn_blocking(move || {
        fuzz("emulator HTTP requests", emulator_request(), |(m, p, q, ct, b)| {
            let mut req =
                format!("{m} {p}{q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n", b.len())
                    .into_bytes();
            req.extend_from_slice(b);
            match exchange(addr, &req) {
                None => Err("the connection was dropped without an answer".into()),
                Some(code) if code >= 500 => Err(format!("answered {code}")),
                Some(_) => Ok(()),
            }
        });
    })
    .await
    .expect("fuzz");
}

/// A request to the gateway: target, Authorization and body.
fn gateway_request() -> impl Strategy<Value = (String, String, Vec<u8>)> {
    let auth = prop_oneof![
        Just(String::new()),
        Just("AWS4-HMAC-SHA256 Credential=AKIA/20261126/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=x".to_owned()),
        "[ -~]{0,80}",
    ];
    (
        target_header(),
        auth,
        prop_oneof![dynamodb_body().prop_map(|v| v.to_string().into_bytes()), proptest::collection::vec(any::<u8>(), 0..256)],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzz_the_gateways_http_handling() {
    use kube::runtime::events::{Recorder, Reporter};
    use statelock::gateway::{effects::EffectsConfig, memory::MemoryTables, server};
    let cluster = TestCluster::start().await;
    cluster.install_crds().await;
    cluster.create_namespace("terraform").await;
    cluster
        .create_lock_source(
            "terraform",
            "tf-locks",
            json!({"dynamodb": {"tableName": "tf-locks", "region": "us-east-1"}, "sync": {"mode": "Scan", "interval": "1h"}, "gateway": {"allowedSourceRanges": ["127.0.0.1/32"]}}),
        )
        .await;
    let client = cluster.client();
    let recorder = Recorder::new(client.clone(), Reporter { controller: "fuzz".into(), instance: None });
    let gw = server::Gateway::new(
        client,
        recorder,
        server::Backend::Memory(std::sync::Arc::new(MemoryTables::default())),
        statelock::metrics::Metrics::new(),
        EffectsConfig::default(),
        std::sync::Arc::new(statelock::tenancy::TenancyPolicy::default()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(server::serve(gw, listener, cancel.clone()));
    tokio::task::spawn_blocking(move || {
        // The gateway answers only once its caches have synced: wait for the first answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        while exchange(addr, b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").is_none() {
            assert!(Instant::now() < deadline, "the gateway never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        fuzz("gateway HTTP requests", gateway_request(), |(target, auth, body)| {
            let mut req = format!(
                "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Amz-Target: {target}\r\nAuthorization: {auth}\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(body);
            match exchange(addr, &req) {
                None => Err("the connection was dropped without an answer".into()),
                Some(code) if code >= 500 => Err(format!("answered {code}")),
                Some(_) => Ok(()),
            }
        });
    })
    .await
    .expect("fuzz");
    cancel.cancel();
}
