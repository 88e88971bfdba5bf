//! What the mirror must change so that a namespace's StateLocks match a lock table: pure, so
//! that restarts, malformed items and name collisions can be tested without any server.

use std::collections::{BTreeMap, HashMap};

use crate::{
    crd::{StateLockSpec, state_lock_name},
    lock_record::{LockRecord, human, parse_created, spec_for},
    reasons,
};

/// A condition the mirror owns on a StateLock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorCondition {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// An event to publish about a StateLock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub reason: &'static str,
    pub warning: bool,
    pub note: String,
}

/// What exists now, as the mirror sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExistingLock {
    pub name: String,
    pub uid: String,
    pub spec: StateLockSpec,
    /// The mirror's conditions as they are: (type, status, message).
    pub conditions: Vec<(String, String, String)>,
    /// `metadata.creationTimestamp`, in nanoseconds since the epoch.
    pub created_at: i128,
}

/// Create or update one StateLock.
#[derive(Clone, Debug, PartialEq)]
pub struct Upsert {
    pub name: String,
    pub spec: StateLockSpec,
    pub write_spec: bool,
    pub conditions: Vec<MirrorCondition>,
    pub write_conditions: bool,
    pub events: Vec<PlannedEvent>,
}

/// Delete one StateLock (its lock was released).
#[derive(Clone, Debug, PartialEq)]
pub struct Removal {
    pub name: String,
    pub uid: String,
    pub lock_id: String,
    pub held_for_secs: Option<i64>,
}

/// Everything to change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub upserts: Vec<Upsert>,
    pub removals: Vec<Removal>,
    /// LockIDs not mirrored because another LockID has their name: (name, lock_id).
    pub collisions: Vec<(String, String)>,
    /// Locks in the table (valid or not).
    pub lock_count: usize,
}

impl Plan {
    /// Does the plan change anything?
    pub fn is_noop(&self) -> bool {
        self.removals.is_empty() && self.upserts.iter().all(|u| !u.write_spec && !u.write_conditions && u.events.is_empty())
    }
}

/// Plan one pass. `now` and `stale_after` are in nanoseconds / seconds.
pub fn plan(source: &str, observed: &[LockRecord], existing: &[ExistingLock], now: i128, stale_after_secs: u64) -> Plan {
    plan_named(source, observed, existing, now, stale_after_secs, &state_lock_name)
}

/// [`plan`] with the naming function given (tests force name collisions with it).
fn plan_named(
    source: &str,
    observed: &[LockRecord],
    existing: &[ExistingLock],
    now: i128,
    stale_after_secs: u64,
    name_of: &dyn Fn(&str) -> String,
) -> Plan {
    let mut out = Plan { lock_count: observed.len(), ..Plan::default() };
    let by_name: HashMap<&str, &ExistingLock> = existing.iter().map(|e| (e.name.as_str(), e)).collect();
    // Group observed locks by name to find collisions deterministically (first LockID wins).
    let mut wanted: BTreeMap<String, &LockRecord> = BTreeMap::new();
    let mut sorted: Vec<&LockRecord> = observed.iter().collect();
    sorted.sort_by(|a, b| a.lock_id.cmp(&b.lock_id));
    for r in sorted {
        let name = name_of(&r.lock_id);
        // An existing object for this name that holds another observed LockID keeps the name.
        if let Some(e) = by_name.get(name.as_str())
            && e.spec.lock_id != r.lock_id
            && observed.iter().any(|o| o.lock_id == e.spec.lock_id)
        {
            out.collisions.push((name, r.lock_id.clone()));
            continue;
        }
        match wanted.get(&name) {
            Some(_) => out.collisions.push((name, r.lock_id.clone())),
            None => {
                wanted.insert(name, r);
            }
        }
    }
    for (name, record) in &wanted {
        let spec = spec_for(source, record);
        let current = by_name.get(name.as_str()).filter(|e| e.spec.lock_id == record.lock_id);
        let mut events = Vec::new();
        match current {
            None => events.push(PlannedEvent { reason: reasons::LOCK_ACQUIRED, warning: false, note: acquired_note(record) }),
            Some(e) if e.spec.lock_info.id != spec.lock_info.id => events.push(PlannedEvent {
                reason: reasons::LOCK_ACQUIRED,
                warning: false,
                note: format!("{} (lock ID changed from {})", acquired_note(record), e.spec.lock_info.id.as_deref().unwrap_or("none")),
            }),
            Some(_) => {}
        }
        // Conditions.
        let info_valid = if record.is_valid() {
            MirrorCondition {
                type_: reasons::CONDITION_INFO_VALID,
                status: "True",
                reason: "Parsed",
                message: "the lock item is a well-formed Terraform lock".into(),
            }
        } else {
            MirrorCondition {
                type_: reasons::CONDITION_INFO_VALID,
                status: "False",
                reason: "Malformed",
                message: record.problems.join("; "),
            }
        };
        let first_seen = current.map_or(now, |e| e.created_at);
        let since = record.info.created.as_deref().and_then(parse_created).unwrap_or(first_seen);
        let age_secs = ((now - since) / 1_000_000_000) as i64;
        let stale = age_secs >= 0 && age_secs as u64 >= stale_after_secs;
        let stale_cond = if stale {
            MirrorCondition {
                type_: reasons::CONDITION_STALE,
                status: "True",
                reason: "HeldTooLong",
                message: format!("held for {}, longer than staleAfter ({})", human(age_secs), human(stale_after_secs as i64)),
            }
        } else {
            MirrorCondition {
                type_: reasons::CONDITION_STALE,
                status: "False",
                reason: "WithinStaleAfter",
                message: format!("held for less than staleAfter ({})", human(stale_after_secs as i64)),
            }
        };
        let was = |t: &str| current.and_then(|e| e.conditions.iter().find(|c| c.0 == t).map(|c| (c.1.clone(), c.2.clone())));
        if info_valid.status == "False" && was(reasons::CONDITION_INFO_VALID) != Some(("False".into(), info_valid.message.clone())) {
            events.push(PlannedEvent {
                reason: reasons::LOCK_MALFORMED,
                warning: true,
                note: format!("lock item {} is malformed: {}", record.lock_id, info_valid.message),
            });
        }
        if stale && was(reasons::CONDITION_STALE).map(|w| w.0) != Some("True".into()) {
            events.push(PlannedEvent {
                reason: reasons::LOCK_STALE,
                warning: true,
                note: format!("{} {}", record.lock_id, stale_cond.message),
            });
        }
        // The stale message changes with the age; rewrite it only when the status flips.
        let conditions_same = was(reasons::CONDITION_INFO_VALID) == Some((info_valid.status.into(), info_valid.message.clone()))
            && was(reasons::CONDITION_STALE).map(|w| w.0) == Some(stale_cond.status.into());
        let write_spec = current.is_none_or(|e| e.spec != spec);
        out.upserts.push(Upsert {
            name: name.clone(),
            spec,
            write_spec,
            write_conditions: !conditions_same,
            conditions: vec![info_valid, stale_cond],
            events,
        });
    }
    for e in existing {
        let still_held = wanted.get(&e.name).is_some_and(|r| r.lock_id == e.spec.lock_id);
        if !still_held {
            let since = e.spec.lock_info.created.as_deref().and_then(parse_created).unwrap_or(e.created_at);
            out.removals.push(Removal {
                name: e.name.clone(),
                uid: e.uid.clone(),
                lock_id: e.spec.lock_id.clone(),
                held_for_secs: Some(((now - since) / 1_000_000_000) as i64),
            });
        }
    }
    out
}

fn acquired_note(r: &LockRecord) -> String {
    let i = &r.info;
    format!(
        "{} took the lock on {} for {} (lock ID {}, Terraform {})",
        i.who.as_deref().unwrap_or("an unknown holder"),
        i.path.as_deref().unwrap_or(&r.lock_id),
        i.operation.as_deref().map_or_else(|| "an unknown operation".to_owned(), crate::lock_record::operation_word),
        i.id.as_deref().unwrap_or("unknown"),
        i.version.as_deref().unwrap_or("unknown"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::LockInfo;

    const NOW: i128 = 1_764_162_000_000_000_000; // 2025-11-26T13:00:00Z

    fn rec(lock_id: &str, id: &str, created: &str) -> LockRecord {
        LockRecord {
            lock_id: lock_id.into(),
            info: LockInfo {
                id: Some(id.into()),
                operation: Some("OperationTypeApply".into()),
                who: Some("root@atlantis-0".into()),
                created: Some(created.into()),
                path: Some(lock_id.into()),
                ..LockInfo::default()
            },
            raw_info: Some(format!("{{\"ID\":\"{id}\"}}")),
            info_sha256: Some(format!("{:064}", id.len())),
            problems: vec![],
            stored_in: vec![],
        }
    }

    fn existing_from(p: &Plan) -> Vec<ExistingLock> {
        p.upserts
            .iter()
            .map(|u| ExistingLock {
                name: u.name.clone(),
                uid: format!("uid-{}", u.name),
                spec: u.spec.clone(),
                conditions: u.conditions.iter().map(|c| (c.type_.to_owned(), c.status.to_owned(), c.message.clone())).collect(),
                created_at: NOW,
            })
            .collect()
    }

    #[test]
    fn a_new_lock_is_created_with_one_acquired_event_and_a_second_pass_is_a_noop() {
        let locks = vec![rec("b/app/terraform.tfstate", "id-1", "2025-11-26T12:59:00Z")];
        let p1 = plan("src", &locks, &[], NOW, 3600);
        assert_eq!(p1.upserts.len(), 1);
        assert!(p1.upserts[0].write_spec && p1.upserts[0].write_conditions);
        assert_eq!(p1.upserts[0].events.iter().map(|e| e.reason).collect::<Vec<_>>(), [reasons::LOCK_ACQUIRED]);
        // A restarted operator sees the objects it made: nothing to write, no event.
        let p2 = plan("src", &locks, &existing_from(&p1), NOW + 5_000_000_000, 3600);
        assert!(p2.is_noop(), "{p2:?}");
    }

    #[test]
    fn a_released_lock_is_removed_with_its_hold_time() {
        let locks = vec![rec("b/app/terraform.tfstate", "id-1", "2025-11-26T12:00:00Z")];
        let p1 = plan("src", &locks, &[], NOW, 7200);
        let p2 = plan("src", &[], &existing_from(&p1), NOW, 7200);
        assert_eq!(p2.removals.len(), 1);
        assert_eq!(p2.removals[0].held_for_secs, Some(3600));
        assert!(p2.upserts.is_empty());
    }

    #[test]
    fn a_reacquired_lock_updates_the_spec_and_says_so() {
        let p1 = plan("src", &[rec("b/k", "id-1", "2025-11-26T12:59:00Z")], &[], NOW, 3600);
        let p2 = plan("src", &[rec("b/k", "id-2", "2025-11-26T12:59:59Z")], &existing_from(&p1), NOW, 3600);
        assert!(p2.upserts[0].write_spec);
        assert!(p2.removals.is_empty(), "same LockID: the object is updated, not replaced");
        assert!(p2.upserts[0].events[0].note.contains("lock ID changed from id-1"));
    }

    #[test]
    fn stale_is_reported_once_and_only_by_age_never_released() {
        let locks = vec![rec("b/k", "id-1", "2025-11-26T10:00:00Z")];
        let p1 = plan("src", &locks, &[], NOW, 3600);
        let u = &p1.upserts[0];
        assert_eq!(u.conditions[1].status, "True");
        assert!(u.events.iter().any(|e| e.reason == reasons::LOCK_STALE && e.warning));
        let p2 = plan("src", &locks, &existing_from(&p1), NOW + 60_000_000_000, 3600);
        assert!(p2.is_noop(), "no second Stale event, no rewrite of the age message: {p2:?}");
        assert!(p2.removals.is_empty());
    }

    #[test]
    fn malformed_items_get_a_condition_and_one_warning() {
        let mut bad = rec("b/k", "", "");
        bad.info = LockInfo::default();
        bad.problems = vec!["Info is not valid JSON: expected value at line 1 column 1".into()];
        bad.raw_info = Some("x".repeat(10_000));
        let p1 = plan("src", &[bad.clone()], &[], NOW, 3600);
        let u = &p1.upserts[0];
        assert_eq!(u.conditions[0].status, "False");
        assert_eq!(u.spec.raw_info.as_deref().map(str::len), Some(4096));
        assert!(u.events.iter().any(|e| e.reason == reasons::LOCK_MALFORMED));
        let p2 = plan("src", &[bad], &existing_from(&p1), NOW, 3600);
        assert!(p2.is_noop());
    }

    #[test]
    fn colliding_names_keep_the_existing_object_and_report_the_other() {
        let same = |_: &str| "one-name".to_owned();
        let a = rec("b/a", "id-a", "2025-11-26T12:59:00Z");
        let b = rec("b/b", "id-b", "2025-11-26T12:59:00Z");
        // Fresh: the first LockID in order wins the name; the other is reported.
        let p1 = plan_named("src", &[b.clone(), a.clone()], &[], NOW, 3600, &same);
        assert_eq!(p1.upserts.len(), 1);
        assert_eq!(p1.upserts[0].spec.lock_id, "b/a");
        assert_eq!(p1.collisions, [("one-name".to_owned(), "b/b".to_owned())]);
        // An existing object keeps its LockID even when another sorts first.
        let mut existing = existing_from(&p1);
        existing[0].spec.lock_id = "b/b".into();
        existing[0].spec = spec_for("src", &b);
        let p2 = plan_named("src", &[a, b], &existing, NOW, 3600, &same);
        assert!(p2.removals.is_empty(), "{p2:?}");
        assert_eq!(p2.collisions, [("one-name".to_owned(), "b/a".to_owned())]);
        assert!(p2.upserts.iter().all(|u| u.spec.lock_id == "b/b"));
    }
}
