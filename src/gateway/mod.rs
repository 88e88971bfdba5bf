//! The DynamoDB-compatible lock gateway: Terraform talks to it instead of DynamoDB, so statelock
//! sees every lock attempt (contention) and exactly which pod made it.
//!
//! [`protocol`] parses and answers the DynamoDB JSON 1.0 calls Terraform makes (pure);
//! [`memory`] is an in-memory table with the same conditional semantics (sandbox and tests).

pub mod caches;
mod convert;
pub mod effects;
pub mod memory;
pub mod protocol;
pub mod server;
