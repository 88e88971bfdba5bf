//! statelock: Terraform/OpenTofu state locks as Kubernetes objects.
//!
//! statelock mirrors the lock records of DynamoDB lock tables into `StateLock` custom resources,
//! resolves each lock's holder to a pod, and releases a lock only on positive evidence that its
//! holder pod is dead, with a conditional delete that can only remove the instance it judged.
//!
//! Layout (dependencies point inward):
//! - [`app`] wires everything together: clients, shutdown, servers. Nothing else reaches across.
//! - [`admin`] serves `/livez` and `/readyz`.
//! - [`mirror`] keeps StateLocks in step with DynamoDB lock tables.
//! - [`dynamo`] builds DynamoDB clients, reads tables and parses their items (the parsing is pure).
//! - [`crd`] holds the resource types: the single source of truth for the CRDs.
//! - [`reasons`] is the vocabulary of event reasons, condition types and field managers.
//! - [`cli`] and [`telemetry`] are the command line and logging.

pub mod admin;
pub mod app;
pub mod cli;
pub mod crd;
pub mod dynamo;
pub mod expiry;
pub mod gateway;
pub mod leader;
pub mod metrics;
pub mod mirror;
pub mod reasons;
pub mod sandbox;
pub mod telemetry;
pub mod tenancy;
