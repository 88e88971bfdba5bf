//! MVCC storage: one global revision, per-key version history (so that paginated lists are
//! served at one revision), a bounded change log (so that old watches get 410), and watchers.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::registry::StorageKey;

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change, as kept in the log and sent to watchers.
#[derive(Debug)]
pub struct Change {
    pub rev: u64,
    pub key: StorageKey,
    pub namespace: String,
    pub name: String,
    pub kind: ChangeType,
    /// The object after the change; for a deletion, the last state stamped with the deletion revision.
    pub object: Arc<Value>,
    /// The object before the change (for selector transitions).
    pub prev: Option<Arc<Value>>,
}

type ObjKey = (String, String);
/// The versions of one object, oldest first; `None` marks a deletion.
type Versions = Vec<(u64, Option<Arc<Value>>)>;

struct Watcher {
    id: u64,
    key: StorageKey,
    tx: mpsc::UnboundedSender<Arc<Change>>,
}

/// The store. Callers hold it behind one mutex.
pub struct Store {
    rev: u64,
    data: HashMap<StorageKey, BTreeMap<ObjKey, Versions>>,
    log: VecDeque<Arc<Change>>,
    log_capacity: usize,
    /// Changes at or below this revision are no longer in the log.
    compacted: u64,
    watchers: Vec<Watcher>,
    next_watcher: u64,
    writes: BTreeMap<StorageKey, u64>,
    expired_watches: u64,
    /// Live objects by UID, so garbage collection does not scan the store per delete.
    by_uid: HashMap<String, (StorageKey, ObjKey)>,
    /// Live objects by the UIDs their ownerReferences name.
    dependents: HashMap<String, BTreeSet<(StorageKey, ObjKey)>>,
}

fn uid_of(o: &Value) -> Option<&str> {
    o["metadata"]["uid"].as_str()
}

fn owner_uids(o: &Value) -> impl Iterator<Item = &str> {
    o["metadata"]["ownerReferences"].as_array().into_iter().flatten().filter_map(|r| r["uid"].as_str())
}

impl Store {
    pub fn new(log_capacity: usize) -> Self {
        Self {
            rev: 1,
            data: HashMap::new(),
            log: VecDeque::new(),
            log_capacity: log_capacity.max(1),
            compacted: 1,
            watchers: Vec::new(),
            next_watcher: 0,
            writes: BTreeMap::new(),
            expired_watches: 0,
            by_uid: HashMap::new(),
            dependents: HashMap::new(),
        }
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.rev
    }

    /// The oldest revision still served from history.
    pub fn compacted_revision(&self) -> u64 {
        self.compacted
    }

    /// The latest version of an object.
    pub fn get(&self, key: &StorageKey, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.data.get(key)?.get(&(ns.to_owned(), name.to_owned()))?.last()?.1.clone()
    }

    /// Objects as of `rev`, ordered by namespace then name, starting after `after` (exclusive).
    pub fn list_at(
        &self,
        key: &StorageKey,
        ns: Option<&str>,
        rev: u64,
        after: Option<&ObjKey>,
    ) -> impl Iterator<Item = (&ObjKey, Arc<Value>)> {
        let map = self.data.get(key);
        map.into_iter().flat_map(move |m| {
            let range: Box<dyn Iterator<Item = (&ObjKey, &Versions)>> = match after {
                Some(a) => Box::new(m.range::<ObjKey, _>((std::ops::Bound::Excluded(a.clone()), std::ops::Bound::Unbounded))),
                None => Box::new(m.iter()),
            };
            range.filter(move |(k, _)| ns.is_none_or(|n| k.0 == n)).filter_map(move |(k, versions)| {
                let v = versions.iter().rev().find(|(r, _)| *r <= rev)?;
                v.1.clone().map(|o| (k, o))
            })
        })
    }

    /// Every live object of a type (latest versions).
    pub fn all(&self, key: &StorageKey) -> Vec<Arc<Value>> {
        self.list_at(key, None, self.rev, None).map(|(_, o)| o).collect()
    }

    /// The types that have stored objects.
    pub fn keys(&self) -> Vec<StorageKey> {
        self.data.keys().cloned().collect()
    }

    /// Allocate the next revision (the caller stamps it into the object before [`Self::commit`]).
    pub fn next_revision(&self) -> u64 {
        self.rev + 1
    }

    /// Store `object` (already stamped with `next_revision()`) or delete (`object` is then the
    /// last state, stamped), append to the log and notify watchers.
    pub fn commit(&mut self, key: &StorageKey, ns: &str, name: &str, kind: ChangeType, object: Value) -> u64 {
        self.rev += 1;
        let rev = self.rev;
        let object = Arc::new(object);
        let versions = self.data.entry(key.clone()).or_default().entry((ns.to_owned(), name.to_owned())).or_default();
        let prev = versions.last().and_then(|(_, o)| o.clone());
        versions.push((rev, if kind == ChangeType::Deleted { None } else { Some(object.clone()) }));
        // Drop versions no list can ask for any more: keep the newest one at or below `compacted`.
        let compacted = self.compacted;
        if let Some(keep_from) = versions.iter().rposition(|(r, _)| *r <= compacted) {
            versions.drain(..keep_from);
        }
        *self.writes.entry(key.clone()).or_default() += 1;
        self.reindex(key, (ns, name), prev.as_deref(), (kind != ChangeType::Deleted).then_some(&*object));
        let change = Arc::new(Change { rev, key: key.clone(), namespace: ns.to_owned(), name: name.to_owned(), kind, object, prev });
        self.log.push_back(change.clone());
        while self.log.len() > self.log_capacity {
            if let Some(old) = self.log.pop_front() {
                self.compacted = old.rev;
            }
        }
        self.watchers.retain(|w| w.key != *key || w.tx.send(change.clone()).is_ok());
        rev
    }

    fn reindex(&mut self, key: &StorageKey, (ns, name): (&str, &str), prev: Option<&Value>, next: Option<&Value>) {
        let at = (key.clone(), (ns.to_owned(), name.to_owned()));
        if let Some(prev) = prev {
            if let Some(uid) = uid_of(prev)
                && self.by_uid.get(uid) == Some(&at)
            {
                self.by_uid.remove(uid);
            }
            for owner in owner_uids(prev) {
                if let Some(set) = self.dependents.get_mut(owner) {
                    set.remove(&at);
                    if set.is_empty() {
                        self.dependents.remove(owner);
                    }
                }
            }
        }
        if let Some(next) = next {
            if let Some(uid) = uid_of(next) {
                self.by_uid.insert(uid.to_owned(), at.clone());
            }
            for owner in owner_uids(next) {
                self.dependents.entry(owner.to_owned()).or_default().insert(at.clone());
            }
        }
    }

    /// Whether a live object has this UID.
    pub fn uid_exists(&self, uid: &str) -> bool {
        self.by_uid.contains_key(uid)
    }

    /// The live objects whose ownerReferences name `owner` (type and latest version).
    pub fn dependents_of(&self, owner: &str) -> Vec<(StorageKey, Arc<Value>)> {
        let Some(set) = self.dependents.get(owner) else { return Vec::new() };
        set.iter().filter_map(|(key, (ns, name))| self.get(key, ns, name).map(|o| (key.clone(), o))).collect()
    }

    /// Forget history up to the current revision: watches and continue tokens from before it get 410.
    pub fn compact(&mut self) -> u64 {
        self.log.clear();
        self.compacted = self.rev;
        let compacted = self.compacted;
        for objects in self.data.values_mut() {
            objects.retain(|_, versions| {
                if let Some(keep_from) = versions.iter().rposition(|(r, _)| *r <= compacted) {
                    versions.drain(..keep_from);
                }
                !(versions.len() == 1 && versions[0].1.is_none())
            });
        }
        compacted
    }

    /// Register a watcher of `key` from revision `from` (exclusive). Returns the logged changes
    /// after `from` and the receiver of later ones, or the oldest servable revision when `from`
    /// is compacted.
    #[allow(clippy::type_complexity)]
    pub fn watch(&mut self, key: &StorageKey, from: u64) -> Result<(u64, Vec<Arc<Change>>, mpsc::UnboundedReceiver<Arc<Change>>), u64> {
        if from < self.compacted {
            self.expired_watches += 1;
            return Err(self.compacted);
        }
        let backlog: Vec<Arc<Change>> = self.log.iter().filter(|c| c.rev > from && c.key == *key).cloned().collect();
        let (tx, rx) = mpsc::unbounded_channel();
        self.next_watcher += 1;
        self.watchers.push(Watcher { id: self.next_watcher, key: key.clone(), tx });
        Ok((self.next_watcher, backlog, rx))
    }

    /// End one watcher.
    pub fn unwatch(&mut self, id: u64) {
        self.watchers.retain(|w| w.id != id);
    }

    /// End every watch stream (their clients see the connection close).
    pub fn drop_watches(&mut self) -> usize {
        let n = self.watchers.len();
        self.watchers.clear();
        n
    }

    /// End the open watch streams of one resource (`group` empty for the core group).
    pub fn drop_watches_of(&mut self, group: &str, plural: &str) -> usize {
        let before = self.watchers.len();
        self.watchers.retain(|w| !(w.key.group == group && w.key.plural == plural));
        before - self.watchers.len()
    }

    /// Open watch streams.
    pub fn watcher_count(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }

    /// Watches refused with 410 Expired because they started from a compacted revision.
    pub fn expired_watches(&self) -> u64 {
        self.expired_watches
    }

    /// Writes per type since start (creates, updates and deletes that changed something).
    pub fn write_counts(&self) -> &BTreeMap<StorageKey, u64> {
        &self.writes
    }
}
