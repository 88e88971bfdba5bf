//! Emulator throughput: object writes per second (in-process baseline, then over HTTP with one
//! and with 8 concurrent clients) and the time to list 10,000 objects. Prints figures; asserts
//! nothing about speed. Run: `cargo bench -p apiserver-emulator --bench throughput`.

use std::time::{Duration, Instant};

use apiserver_emulator::{Api, Clock, Config, Emulator, Options, api::WriteParams};
use futures::future::join_all;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, PostParams};
use serde_json::json;

fn cm(name: String) -> ConfigMap {
    let mut c = ConfigMap::default();
    c.metadata.name = Some(name);
    c.data = Some([("k".to_owned(), "v".repeat(200))].into());
    c
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    const N: usize = 5_000;
    // Baseline: the API core in-process, no HTTP.
    let api = Api::new(Options::default(), Clock::system());
    let rt = api.resource("", "v1", "configmaps").expect("configmaps");
    let t = Instant::now();
    for i in 0..N {
        api.create(
            &rt,
            "default",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("c{i}")}, "data": {"k": "v".repeat(200)}}),
            &WriteParams::default(),
        )
        .expect("create");
    }
    let in_process = rate(N, t.elapsed());

    let emu = Emulator::start("127.0.0.1:0".parse().expect("addr"), Config::default()).await.expect("start");
    let mut config = kube::Config::new(emu.url().parse().expect("url"));
    config.default_namespace = "default".into();
    let client = kube::Client::try_from(config).expect("client");
    let cms: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), "default");

    let t = Instant::now();
    for i in 0..N {
        cms.create(&PostParams::default(), &cm(format!("s{i}"))).await.expect("create");
    }
    let sequential = rate(N, t.elapsed());

    let t = Instant::now();
    let tasks = (0..8).map(|w| {
        let cms = cms.clone();
        async move {
            for i in 0..N / 8 {
                cms.create(&PostParams::default(), &cm(format!("p{w}-{i}"))).await.expect("create");
            }
        }
    });
    join_all(tasks).await;
    let concurrent = rate(N / 8 * 8, t.elapsed());

    // List 10,000 objects (the namespace now holds 10,000 ConfigMaps).
    let total = cms.list(&ListParams::default()).await.expect("list").items.len();
    let t = Instant::now();
    let all = cms.list(&ListParams::default()).await.expect("list");
    let list_one = t.elapsed();
    let t = Instant::now();
    let mut token: Option<String> = None;
    let mut paged = 0;
    loop {
        let mut lp = ListParams::default().limit(500);
        if let Some(tok) = &token {
            lp = lp.continue_token(tok);
        }
        let page = cms.list(&lp).await.expect("page");
        paged += page.items.len();
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
    }
    let list_paged = t.elapsed();

    println!("apiserver-emulator throughput (2 cores; ConfigMaps with a 200-byte value)");
    println!("  writes/s in-process (baseline, no HTTP): {in_process:>10.0}");
    println!("  writes/s over HTTP, 1 client:            {sequential:>10.0}  ({:.2}x of baseline)", sequential / in_process);
    println!("  writes/s over HTTP, 8 clients:           {concurrent:>10.0}  ({:.2}x of baseline)", concurrent / in_process);
    println!("  list {} objects, one request:         {:>8.1} ms", all.items.len(), list_one.as_secs_f64() * 1e3);
    println!("  list {paged} objects, pages of 500:       {:>8.1} ms", list_paged.as_secs_f64() * 1e3);
    assert_eq!(total, 10_000, "the namespace holds the objects the figures are about");
    emu.stop().await;
}
