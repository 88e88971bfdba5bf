//! statelock: Terraform/OpenTofu state locks as Kubernetes objects.
//!
//! statelock mirrors the lock records of DynamoDB lock tables into `StateLock` custom resources,
//! resolves each lock's holder to a pod, and releases a lock only on positive evidence that its
//! holder pod is dead, with a conditional delete that can only remove the instance it judged.
//!
//! Layout (dependencies point inward):
//! - [`app`] wires everything together: clients, shutdown, servers. Nothing else reaches across.
//! - [`apply`] is the chart's hook that creates or updates the default LockSource.
//! - [`admin`] serves `/livez`, `/readyz` and `/metrics` ([`metrics`]).
//! - [`leader`] elects the one replica that mirrors, expires and writes.
//! - [`cluster`] holds the shared watches: one LockSource, one StateLock and one (trimmed,
//!   scoped) Pod cache per replica, read by the mirror, the expiry controller and the gateway,
//!   and the one StateLock writer.
//! - [`mirror`] keeps StateLocks in step with DynamoDB lock tables.
//! - [`expiry`] judges holders and releases the locks of dead ones (the decisions are pure).
//! - [`gateway`] is the DynamoDB-compatible lock gateway.
//! - [`tenancy`] says which LockSources may be served, with whose identity and endpoints.
//! - [`sandbox`] runs all of it against an embedded API server emulator.
//! - [`lock_record`] is the Terraform/OpenTofu lock record, whatever stores it (pure).
//! - [`dynamo`] builds DynamoDB clients, reads tables and parses their items (the parsing is pure).
//! - [`crd`] holds the resource types: the single source of truth for the CRDs.
//! - [`errors`] is the one vocabulary of error categories (transient or permanent).
//! - [`reasons`] is the vocabulary of event reasons, condition types and field managers.
//! - [`cli`] and [`telemetry`] are the command line and logging.

pub mod admin;
pub mod app;
pub mod apply;
pub mod cli;
pub mod cluster;
pub mod crd;
pub mod dynamo;
pub mod errors;
pub mod expiry;
pub mod gateway;
pub mod kube_client;
pub mod leader;
pub mod lock_record;
pub mod lock_store;
pub mod metrics;
pub mod mirror;
pub mod plugin;
pub mod reasons;
pub mod s3;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod telemetry;
pub mod tenancy;
