//! `kubectl statelock`: the statelock binary, installed (or linked) as `kubectl-statelock` on
//! `PATH`, is a kubectl plugin. `list` shows the locks, `why NAME` says in plain words why a lock
//! is or is not being released, `unlock NAME [--live]` asks for a manual unlock (the
//! `statelock.dev/force-unlock` annotation), waits for the operator's answer and prints it.
//! kubectl's `-n/--namespace`, `-A/--all-namespaces`, `--kubeconfig` and `--context` work as usual.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use k8s_openapi::{api::events::v1::Event, jiff::Timestamp};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

use crate::{
    crd::{LockSource, StateLock},
    expiry::manual_unlock::{FORCE_UNLOCK_ANNOTATION, FORCE_UNLOCK_LIVE_ANNOTATION, FORCE_UNLOCK_REQUEST_ANNOTATION, answer_mark},
    lock_record::{human, operation_word, parse_created},
    reasons,
};

/// The plugin's command line (`kubectl statelock ...`).
#[derive(Debug, Parser)]
#[command(
    name = "kubectl statelock",
    version,
    about = "Terraform/OpenTofu state locks in this cluster, and why they are or are not released"
)]
pub struct PluginCli {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,

    /// Every namespace (`list` only).
    #[arg(short = 'A', long = "all-namespaces", global = true)]
    pub all_namespaces: bool,

    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context.
    #[arg(long, global = true)]
    pub context: Option<String>,

    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// The locks: path, holder and its state, age, waiters, where the lock is stored.
    List,
    /// Why a lock is or is not being released: the verdict on its holder and its evidence.
    Why {
        /// The StateLock's name (`kubectl statelock list` shows it).
        name: String,
    },
    /// Ask statelock to release a lock (as `terraform force-unlock LOCK_ID` would, but only on
    /// evidence unless --live), wait for its answer and print it.
    Unlock {
        /// The StateLock's name.
        name: String,
        /// The lock ID you mean to release (`why NAME` prints it). As with
        /// `terraform force-unlock`, a lock re-taken since you looked has another ID and is not
        /// released.
        lock_id: String,
        /// Release even though the holder is not known to be dead (Alive, Unknown, Ambiguous).
        #[arg(long)]
        live: bool,
        /// How long to wait for the operator's answer.
        #[arg(long, default_value = "60s", value_parser = crate::cli::parse_duration)]
        timeout: Duration,
    },
}

/// Whether this process was started as the kubectl plugin (its file name is `kubectl-statelock`).
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0).file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("kubectl-statelock"))
}

/// What went wrong, in words for the terminal.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot load the kubeconfig: {0}")]
    Config(String),
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("StateLock {namespace}/{name} not found (kubectl statelock list -n {namespace} shows the locks)")]
    NotFound { namespace: String, name: String },
    #[error(
        "no answer from statelock within {0:?}, {1}; `kubectl statelock why` shows what holds the lock back (is the operator running? kubectl get lease -A shows its leader)"
    )]
    NoAnswer(Duration, &'static str),
    #[error("statelock did not release the lock: {0}")]
    NotReleased(String),
    #[error(
        "StateLock {namespace}/{name} already has an unlock request pending (for lock ID {pending}); wait for its answer (kubectl get events -n {namespace} --field-selector regarding.name={name}), or remove it with: kubectl annotate statelock -n {namespace} {name} {FORCE_UNLOCK_ANNOTATION}-"
    )]
    RequestPending { namespace: String, name: String, pending: String },
    #[error(
        "StateLock {namespace}/{name} kept changing (or was re-created) while the request was being made; nothing was requested, run the command again"
    )]
    Changed { namespace: String, name: String },
}

/// Run a plugin command; the text to print.
pub async fn run(cli: PluginCli) -> Result<String, PluginError> {
    let (client, default_ns) = client(&cli).await?;
    let ns = cli.namespace.clone().unwrap_or(default_ns);
    match cli.command {
        PluginCommand::List => list(&client, (!cli.all_namespaces).then_some(ns.as_str())).await,
        PluginCommand::Why { name } => why(&client, &ns, &name).await,
        // The operator compares IDs trimmed: so does the plugin, in what it sets and what it checks.
        PluginCommand::Unlock { name, lock_id, live, timeout } => unlock(&client, &ns, &name, lock_id.trim(), live, timeout).await,
    }
}

async fn client(cli: &PluginCli) -> Result<(Client, String), PluginError> {
    let options = KubeConfigOptions { context: cli.context.clone(), ..KubeConfigOptions::default() };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| PluginError::Config(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &options).await.map_err(|e| PluginError::Config(e.to_string()))?
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&options).await.map_err(|e| PluginError::Config(e.to_string()))?,
        None => Config::infer().await.map_err(|e| PluginError::Config(e.to_string()))?,
    };
    let ns = config.default_namespace.clone();
    Ok((Client::try_from(config)?, ns))
}

fn age(lock: &StateLock, now: Timestamp) -> String {
    lock.spec
        .lock_info
        .created
        .as_deref()
        .and_then(parse_created)
        .map_or_else(|| "?".into(), |c| human(i64::try_from((now.as_nanosecond() - c) / 1_000_000_000).unwrap_or(i64::MAX)))
}

fn holder_state(lock: &StateLock) -> String {
    lock.status.as_ref().and_then(|s| s.holder.as_ref()).map_or_else(|| "-".into(), |h| format!("{:?}", h.state))
}

fn stored_in(lock: &StateLock) -> String {
    let parts: Vec<&str> = lock.spec.stored_in.iter().map(|k| k.as_str()).collect();
    if parts.is_empty() { "DynamoDB".into() } else { parts.join("+") }
}

/// A plain table, columns padded to their widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> =
        (0..rows.first().map_or(0, Vec::len)).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

async fn list(client: &Client, namespace: Option<&str>) -> Result<String, PluginError> {
    let api: Api<StateLock> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut locks = api.list(&ListParams::default()).await?.items;
    if locks.is_empty() {
        return Ok(match namespace {
            Some(ns) => format!("No state locks in namespace {ns}.\n"),
            None => "No state locks in any namespace.\n".into(),
        });
    }
    locks.sort_by_key(|l| (l.namespace(), l.name_any()));
    let now = Timestamp::now();
    let mut rows =
        vec![["NAMESPACE", "NAME", "PATH", "HOLDER", "STATE", "OPERATION", "AGE", "WAITERS", "STORED-IN"].map(String::from).to_vec()];
    for l in &locks {
        let i = &l.spec.lock_info;
        rows.push(vec![
            l.namespace().unwrap_or_default(),
            l.name_any(),
            i.path.clone().unwrap_or_else(|| l.spec.lock_id.clone()),
            i.who.clone().unwrap_or_else(|| "?".into()),
            holder_state(l),
            i.operation.as_deref().map_or_else(|| "?".into(), operation_word),
            age(l, now),
            l.status.as_ref().and_then(|s| s.contention.as_ref()).map_or(0, |c| c.waiter_count).to_string(),
            stored_in(l),
        ]);
    }
    if namespace.is_some() {
        for r in &mut rows {
            r.remove(0);
        }
    }
    Ok(table(&rows))
}

async fn get_lock(client: &Client, ns: &str, name: &str) -> Result<StateLock, PluginError> {
    Api::<StateLock>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .ok_or_else(|| PluginError::NotFound { namespace: ns.to_owned(), name: name.to_owned() })
}

async fn why(client: &Client, ns: &str, name: &str) -> Result<String, PluginError> {
    let lock = get_lock(client, ns, name).await?;
    let source = Api::<LockSource>::namespaced(client.clone(), ns).get_opt(&lock.spec.source).await?;
    Ok(explain(&lock, source.as_ref(), Timestamp::now()))
}

/// The verdict on a lock and its evidence, in plain words (pure, for the tests).
pub fn explain(lock: &StateLock, source: Option<&LockSource>, now: Timestamp) -> String {
    use crate::crd::{ExpiryMode, HolderState, LockPhase};
    let i = &lock.spec.lock_info;
    let status = lock.status.clone().unwrap_or_default();
    let mut out = format!("{}/{}: the lock on {}\n", lock.namespace().unwrap_or_default(), lock.name_any(), lock.spec.lock_id);
    out.push_str(&format!(
        "  held by {} for {} ({}, lock ID {}), stored in {}\n",
        i.who.as_deref().unwrap_or("an unknown holder"),
        age(lock, now),
        i.operation.as_deref().map_or_else(|| "unknown operation".into(), operation_word),
        i.id.as_deref().unwrap_or("?"),
        stored_in(lock)
    ));
    let Some(holder) = &status.holder else {
        out.push_str("  statelock has not judged its holder yet.\n");
        return out;
    };
    let who = match (&holder.namespace, &holder.pod) {
        (Some(n), Some(p)) => format!("pod {n}/{p}"),
        _ => holder.hostname.as_deref().map_or_else(|| "the holder".into(), |h| format!("host {h}")),
    };
    let verdict = match holder.state {
        HolderState::Alive => format!("{who} is alive"),
        HolderState::Dead => format!("{who} is dead"),
        HolderState::Unknown => format!("whether {who} is alive is not known"),
        HolderState::External => format!("{who} is outside the cluster (no pod of that name)"),
        HolderState::Ambiguous => format!("several pods could be the holder ({})", holder.candidates.join(", ")),
    };
    out.push_str(&format!("  verdict: {verdict} ({})", holder.reason));
    if let Some(m) = &holder.message {
        out.push_str(&format!(": {m}"));
    }
    out.push('\n');
    if let Some(e) = &holder.evidence {
        out.push_str(&format!("  evidence: {} since {}: {}\n", e.reason, e.observed_at.0, e.message));
    }
    let mode = source.map(|s| (s.spec.expiry.mode, s.spec.expiry.grace_period.to_string()));
    let decision = match (holder.state, status.phase, &mode) {
        (_, Some(LockPhase::Released), _) => "statelock released it; the StateLock goes away with the next sync.".to_owned(),
        (HolderState::Dead, _, Some((ExpiryMode::Release, grace))) => {
            format!("it is released once the evidence has held for the grace period ({grace}), if nothing blocks it (below).")
        }
        (HolderState::Dead, _, Some((ExpiryMode::Observe, _))) => format!(
            "LockSource {} is in Observe mode: statelock only reports. Release it with `kubectl statelock unlock {} {}`.",
            lock.spec.source,
            lock.name_any(),
            i.id.as_deref().unwrap_or("<lock ID>")
        ),
        (HolderState::Alive, ..) => "a lock whose holder is alive is never released.".to_owned(),
        (HolderState::External, ..) => format!(
            "statelock never releases an external holder's lock on its own; if you know it is dead, `kubectl statelock unlock {} {}`.",
            lock.name_any(),
            i.id.as_deref().unwrap_or("<lock ID>")
        ),
        (HolderState::Unknown | HolderState::Ambiguous, ..) => {
            "nothing is released without evidence; it is judged again when the pods or the lock change.".to_owned()
        }
        (_, _, None) => format!("its LockSource {} is not found, so nothing is released.", lock.spec.source),
    };
    out.push_str(&format!("  so: {decision}\n"));
    if let Some(r) = &status.release {
        out.push_str(&format!("  blocked: {} ({})\n", r.message, r.reason));
    }
    out
}

/// How often an unlock request is tried on a StateLock that changes in between.
const REQUEST_ATTEMPTS: u32 = 5;

async fn unlock(client: &Client, ns: &str, name: &str, id: &str, live: bool, timeout: Duration) -> Result<String, PluginError> {
    let lock = get_lock(client, ns, name).await?;
    let uid = lock.uid().unwrap_or_default();
    // The request's token: every event answering this request begins with its mark, so that
    // another request's answer (someone else's, or an earlier one of ours) is never taken for it.
    // No clock is compared (this machine's may differ from the cluster's).
    let token = request_token_now();
    let mark = answer_mark(Some(&token));
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let answers = || async {
        let list = events.list(&ListParams::default()).await?.items;
        Ok::<Vec<Event>, kube::Error>(
            list.into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid.as_str()))
                .filter(|e| e.note.as_deref().is_some_and(|n| n.starts_with(&mark)))
                .collect(),
        )
    };
    // A leftover live override from an earlier request must not make this one live.
    let annotations = json!({
        FORCE_UNLOCK_ANNOTATION: id,
        // The override names the lock it is for: it never applies to another request.
        FORCE_UNLOCK_LIVE_ANNOTATION: if live { json!(id) } else { json!(null) },
        FORCE_UNLOCK_REQUEST_ANNOTATION: token,
    });
    let api: Api<StateLock> = Api::namespaced(client.clone(), ns);
    // Someone else's request (the plugin's or a `kubectl annotate`) is never overwritten: its
    // requester waits for its answer. The request is conditional on the object as read, so one
    // made in between is not overwritten either; a status write in between (the gateway updates
    // waiters while a lock is contended) only makes it read and try again.
    let changed = || PluginError::Changed { namespace: ns.to_owned(), name: name.to_owned() };
    let mut lock = lock;
    for attempt in 1.. {
        if let Some(pending) = lock.annotations().get(FORCE_UNLOCK_ANNOTATION) {
            return Err(PluginError::RequestPending { namespace: ns.to_owned(), name: name.to_owned(), pending: pending.clone() });
        }
        let Some(version) = lock.resource_version() else { return Err(changed()) };
        let request = json!({"metadata": {"annotations": annotations, "resourceVersion": version}});
        match api.patch(name, &PatchParams::default(), &Patch::Merge(request)).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < REQUEST_ATTEMPTS => {
                lock = get_lock(client, ns, name).await?;
                if lock.uid().unwrap_or_default() != uid {
                    return Err(changed());
                }
            }
            Err(kube::Error::Api(e)) if e.code == 409 => return Err(changed()),
            Err(e) => return Err(e.into()),
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut told: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let text = |e: &Event| {
        format!("{}: {}", e.reason.as_deref().unwrap_or_default(), e.note.as_deref().unwrap_or_default().trim_start_matches(&mark))
    };
    // A final answer ends the wait: a release is believed once the StateLock agrees.
    let conclude = async |e: &Event| {
        if e.reason.as_deref() == Some(reasons::FORCE_UNLOCKED) {
            confirm_released(&api, name, &uid, (id, &token, live), deadline, text(e)).await
        } else {
            Err(PluginError::NotReleased(text(e)))
        }
    };
    loop {
        let seen = answers().await?;
        if let Some(e) = final_answer(&seen) {
            return conclude(e).await;
        }
        // Progress: a failed attempt that is tried again, a part released.
        for e in &seen {
            if told.insert(e.name_any()) {
                eprintln!("{}", text(e));
            }
        }
        let now = api.get_opt(name).await?.filter(|l| l.uid().unwrap_or_default() == uid);
        let Some(now) = now else {
            // The lock went away (its holder unlocked it, or the release finished) and the request with it.
            return Ok(format!(
                "StateLock {ns}/{name} is gone: the lock was released (by its holder, or by statelock before it answered), or the StateLock was deleted.\n"
            ));
        };
        if now.annotations().get(FORCE_UNLOCK_REQUEST_ANNOTATION) != Some(&token) {
            // Handled (answers are published before the request is removed) or replaced.
            let seen = answers().await?;
            if let Some(e) = final_answer(&seen) {
                return conclude(e).await;
            }
            if let Some(e) = seen.iter().find(|e| e.reason.as_deref() == Some(reasons::LOCK_PARTIALLY_RELEASED)) {
                return Err(PluginError::NotReleased(text(e)));
            }
            return Err(PluginError::NotReleased(
                "the request was removed without an answer: another request replaced it, or its answer could not be published".into(),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            // The request is withdrawn, unless it was taken up or replaced meanwhile: it must not
            // be carried out later, when nobody is waiting for its answer.
            let withdrawn = withdraw(&api, name, &token, id, live).await;
            let what =
                if withdrawn { "the request was withdrawn" } else { "the request could not be withdrawn and may still be carried out" };
            return Err(PluginError::NoAnswer(timeout, what));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A `ForceUnlocked` answer is believed once the StateLock says so too: it is gone, or it shows
/// another lock (anyone who may create Events could write the answer; only the operator's mirror
/// removes the StateLock of a released lock). Not confirmed in time, the request is withdrawn (if
/// it is still there as this plugin set it), so that a forged answer leaves nothing pending.
async fn confirm_released(
    api: &Api<StateLock>,
    name: &str,
    uid: &str,
    (id, token, live): (&str, &str, bool),
    deadline: tokio::time::Instant,
    answer: String,
) -> Result<String, PluginError> {
    let deadline = deadline.max(tokio::time::Instant::now() + Duration::from_secs(30));
    loop {
        let now = api.get_opt(name).await?;
        if now.is_none_or(|l| l.uid().unwrap_or_default() != uid || l.spec.lock_info.id.as_deref() != Some(id)) {
            return Ok(format!("{answer}\n"));
        }
        if tokio::time::Instant::now() >= deadline {
            let withdrawn = withdraw(api, name, token, id, live).await;
            return Err(PluginError::NotReleased(format!(
                "{answer}; but the StateLock still shows lock {id}: the answer is not confirmed{} (run: kubectl statelock why {name})",
                if withdrawn { " and the request was withdrawn" } else { "" }
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Remove this plugin's request, only as it set it (its token, its lock ID, its override): another
/// person's request or override made since stays. True when removed.
async fn withdraw(api: &Api<StateLock>, name: &str, token: &str, id: &str, live: bool) -> bool {
    let pointer = |k: &str| format!("/metadata/annotations/{}", k.replace('~', "~0").replace('/', "~1"));
    let mut ops = vec![
        json!({"op": "test", "path": pointer(FORCE_UNLOCK_REQUEST_ANNOTATION), "value": token}),
        json!({"op": "test", "path": pointer(FORCE_UNLOCK_ANNOTATION), "value": id}),
    ];
    if live {
        ops.push(json!({"op": "test", "path": pointer(FORCE_UNLOCK_LIVE_ANNOTATION), "value": id}));
    }
    for k in [FORCE_UNLOCK_ANNOTATION, FORCE_UNLOCK_REQUEST_ANNOTATION] {
        ops.push(json!({"op": "remove", "path": pointer(k)}));
    }
    if live {
        ops.push(json!({"op": "remove", "path": pointer(FORCE_UNLOCK_LIVE_ANNOTATION)}));
    }
    match serde_json::from_value::<json_patch::Patch>(serde_json::Value::Array(ops)) {
        Ok(p) => api.patch(name, &PatchParams::default(), &Patch::<()>::Json(p)).await.is_ok(),
        Err(_) => false,
    }
}

/// The events that end a request: released, refused, the wrong ID, or the lock changed.
const FINAL_ANSWERS: [&str; 4] = [reasons::FORCE_UNLOCKED, reasons::UNLOCK_REFUSED, reasons::UNLOCK_ID_MISMATCH, reasons::RELEASE_SKIPPED];

/// The first event among `seen` that ends the request.
fn final_answer(seen: &[Event]) -> Option<&Event> {
    seen.iter().find(|e| e.reason.as_deref().is_some_and(|r| FINAL_ANSWERS.contains(&r)))
}

/// A token that no other request carries: the time in nanoseconds and this process's ID.
fn request_token_now() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_is_recognised_by_its_file_name() {
        assert!(invoked_as_plugin(std::ffi::OsStr::new("/usr/local/bin/kubectl-statelock")));
        assert!(invoked_as_plugin(std::ffi::OsStr::new("kubectl-statelock")));
        assert!(!invoked_as_plugin(std::ffi::OsStr::new("/usr/bin/statelock")));
        assert!(!invoked_as_plugin(std::ffi::OsStr::new("kubectl")));
    }
}
