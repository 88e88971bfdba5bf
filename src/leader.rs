//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Every replica keeps its caches warm; only the leader mirrors, expires and writes their status
//! (the gateway serves, and records what it sees, on every replica).
//! Leadership is held locally only until `renew_deadline` after the start of the last successful
//! renewal, so a leader cut off from the API server stops acting on its own before anyone else may
//! take over (others wait a full `duration` after they last saw the Lease change, measured on
//! their own clock, so clock skew between nodes does not matter).
//!
//! (kube-lease-manager was the other option; its watch channel reports only state changes it
//! observed through the API, so a leader whose renewals fail keeps believing it leads.)

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease timing and identity.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long others wait after the Lease last changed before taking it over.
    pub duration: Duration,
    /// How long the leader acts after the start of its last successful renewal.
    pub renew_deadline: Duration,
    /// How often the Lease is renewed or tried.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(name: impl Into<String>, namespace: impl Into<String>, identity: impl Into<String>, duration: Duration) -> Self {
        // client-go's proportions: 15 s / 10 s / 2 s.
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration,
            renew_deadline: duration.mul_f64(2.0 / 3.0),
            retry_period: (duration / 7).max(Duration::from_millis(200)),
        }
    }
}

/// Whether this replica may act as the leader now.
#[derive(Clone, Debug)]
pub struct Leadership {
    valid_until: Arc<Mutex<Option<Instant>>>,
    changes: watch::Receiver<bool>,
    // Keeps the channel open for `always()`.
    _sender: Option<Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// Leader election off: this replica always leads.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        Self { valid_until: Arc::new(Mutex::new(Some(far))), changes: rx, _sender: Some(Arc::new(tx)) }
    }

    /// True while the last renewal is recent enough; checked right before every write.
    pub fn is_leader(&self) -> bool {
        self.valid_until.lock().unwrap_or_else(PoisonError::into_inner).is_some_and(|t| Instant::now() < t)
    }

    /// A channel that changes when leadership is gained or lost.
    pub fn changes(&self) -> watch::Receiver<bool> {
        self.changes.clone()
    }

    /// Wait until this replica leads (or `shutdown`); false on shutdown.
    pub async fn acquired(&self, shutdown: &CancellationToken) -> bool {
        let mut rx = self.changes();
        tokio::select! {
            r = rx.wait_for(|l| *l) => r.is_ok(),
            () = shutdown.cancelled() => false,
        }
    }

    /// Wait until this replica no longer leads (or `shutdown`).
    pub async fn lost(&self, shutdown: &CancellationToken) {
        let mut rx = self.changes();
        tokio::select! {
            _ = rx.wait_for(|l| !*l) => {},
            () = shutdown.cancelled() => {},
        }
    }
}

/// Run the election until `shutdown`, then hand the Lease back (if held) so that another replica
/// takes over at once. `on_change` is told every gain and loss (for metrics).
pub fn start(
    client: Client,
    config: LeaseConfig,
    shutdown: CancellationToken,
    on_change: impl Fn(bool) + Send + 'static,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let valid_until = Arc::new(Mutex::new(None));
    let leadership = Leadership { valid_until: valid_until.clone(), changes: rx, _sender: None };
    let task = tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let mut observed: Option<(String, Instant)> = None;
        loop {
            let started = Instant::now();
            match try_acquire_or_renew(&api, &config, &mut observed).await {
                Ok(true) => *valid_until.lock().unwrap_or_else(PoisonError::into_inner) = Some(started + config.renew_deadline),
                Ok(false) => *valid_until.lock().unwrap_or_else(PoisonError::into_inner) = None,
                Err(e) => warn!(error = %e, lease = %config.name, "failed to read or renew the Lease"),
            }
            let leading = leadership_now(&valid_until);
            if *tx.borrow() != leading {
                if leading {
                    info!(identity = %config.identity, lease = %config.name, "became the leader");
                } else {
                    warn!(identity = %config.identity, lease = %config.name, "not the leader any more; stopped writing");
                }
                on_change(leading);
                let _ = tx.send(leading);
            }
            // Wake up early enough to notice our own deadline passing.
            let next = match *valid_until.lock().unwrap_or_else(PoisonError::into_inner) {
                Some(until) => (started + config.retry_period).min(until),
                None => started + config.retry_period,
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {},
                () = shutdown.cancelled() => break,
            }
        }
        let was_leading = leadership_now(&valid_until);
        *valid_until.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let _ = tx.send(false);
        if was_leading {
            on_change(false);
            match release(&api, &config).await {
                Ok(()) => info!(lease = %config.name, "released the Lease"),
                Err(e) => {
                    warn!(error = %e, lease = %config.name, "failed to release the Lease; another replica takes over when it expires")
                }
            }
        }
    });
    (leadership, task)
}

fn leadership_now(valid_until: &Mutex<Option<Instant>>) -> bool {
    valid_until.lock().unwrap_or_else(PoisonError::into_inner).is_some_and(|t| Instant::now() < t)
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn duration_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// One round: take a free or expired Lease, renew our own, or see someone else's. Writes use the
/// Lease's resourceVersion, so two replicas can never both succeed.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<(String, Instant)>,
) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(config.name.clone()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_secs(config.duration)),
                acquire_time: Some(now_micro()),
                renew_time: Some(now_micro()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
    let now = Instant::now();
    if observed.as_ref().is_none_or(|(seen, _)| *seen != rv) {
        *observed = Some((rv, now));
    }
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let theirs = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0).max(0)).unwrap_or(0));
    let ours = holder.as_deref() == Some(config.identity.as_str());
    let expired = observed.as_ref().is_some_and(|(_, since)| now.duration_since(*since) >= theirs);
    if !ours && holder.is_some() && !expired {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(now_micro());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration_secs(config.duration));
    spec.renew_time = Some(now_micro());
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(updated) => {
            *observed = updated.metadata.resource_version.map(|rv| (rv, Instant::now()));
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Hand the Lease back: no holder, so the next replica to look takes it at once.
async fn release(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else { return Ok(()) };
    let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now_micro());
    api.replace(&config.name, &PostParams::default(), &lease).await.map(|_| ())
}
