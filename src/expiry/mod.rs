//! Expiry: deciding whether a lock's holder is dead ([`holder_liveness`], pure) and releasing
//! the lock only then ([`decision`], pure: grace period, Observe, manual unlock, requeue), with a
//! delete conditioned on the exact lock instance judged.

pub mod controller;
pub mod decision;
pub mod holder_liveness;
pub mod manual_unlock;
pub mod pod_hostname;
