//! An in-memory lock table with DynamoDB's conditional semantics, for the sandbox and for tests.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use serde_json::Value;

use super::protocol::{Condition, DynamoErrorBody, Item};

/// Tables by name, each a map from LockID to item.
#[derive(Debug, Default)]
pub struct MemoryTables {
    tables: Mutex<HashMap<String, HashMap<String, Item>>>,
}

fn holds(item: Option<&Item>, c: &Condition) -> bool {
    match c {
        Condition::NotExists(attr) => item.is_none_or(|i| !i.contains_key(attr)),
        Condition::Equals(attr, v) => item.and_then(|i| i.get(attr)) == Some(v),
    }
}

fn key_of(item: &Item) -> String {
    item.get("LockID").and_then(|v| v.get("S")).and_then(Value::as_str).unwrap_or_default().to_owned()
}

impl MemoryTables {
    /// Tables that exist from the start.
    pub fn with_tables(names: &[&str]) -> Self {
        let t = Self::default();
        for n in names {
            t.create(n);
        }
        t
    }

    pub fn create(&self, name: &str) {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner).entry(name.to_owned()).or_default();
    }

    pub fn put(&self, table: &str, item: Item, condition: Option<&Condition>) -> Result<(), DynamoErrorBody> {
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let t = tables.get_mut(table).ok_or_else(|| DynamoErrorBody::resource_not_found(table))?;
        let key = key_of(&item);
        if let Some(c) = condition
            && !holds(t.get(&key), c)
        {
            return Err(DynamoErrorBody::conditional_check_failed());
        }
        t.insert(key, item);
        Ok(())
    }

    /// Every item of `table`, in LockID order.
    pub fn scan(&self, table: &str) -> Result<Vec<Item>, DynamoErrorBody> {
        let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let t = tables.get(table).ok_or_else(|| DynamoErrorBody::resource_not_found(table))?;
        let mut items: Vec<(&String, &Item)> = t.iter().collect();
        items.sort_by_key(|(k, _)| *k);
        Ok(items.into_iter().map(|(_, v)| v.clone()).collect())
    }

    pub fn get(&self, table: &str, key: &Item) -> Result<Option<Item>, DynamoErrorBody> {
        let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let t = tables.get(table).ok_or_else(|| DynamoErrorBody::resource_not_found(table))?;
        Ok(t.get(&key_of(key)).cloned())
    }

    pub fn delete(&self, table: &str, key: &Item, condition: Option<&Condition>) -> Result<(), DynamoErrorBody> {
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let t = tables.get_mut(table).ok_or_else(|| DynamoErrorBody::resource_not_found(table))?;
        let k = key_of(key);
        if let Some(c) = condition
            && !holds(t.get(&k), c)
        {
            return Err(DynamoErrorBody::conditional_check_failed());
        }
        t.remove(&k);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    fn lock(id: &str, info: &str) -> Item {
        [("LockID".to_owned(), json!({"S": id})), ("Info".to_owned(), json!({"S": info}))].into()
    }

    #[test]
    fn conditional_semantics_match_dynamodb() {
        let t = MemoryTables::with_tables(&["tf"]);
        let not_exists = Condition::NotExists("LockID".into());
        t.put("tf", lock("a", "one"), Some(&not_exists)).expect("first lock");
        assert_eq!(t.put("tf", lock("a", "two"), Some(&not_exists)).expect_err("held").code(), "ConditionalCheckFailedException");
        let wrong = Condition::Equals("Info".into(), json!({"S": "two"}));
        assert_eq!(t.delete("tf", &lock("a", ""), Some(&wrong)).expect_err("not that instance").code(), "ConditionalCheckFailedException");
        t.delete("tf", &lock("a", ""), Some(&Condition::Equals("Info".into(), json!({"S": "one"})))).expect("exact release");
        assert_eq!(t.get("tf", &lock("a", "")).expect("get"), None);
        assert_eq!(t.get("nope", &lock("a", "")).expect_err("no table").code(), "ResourceNotFoundException");
    }

    #[test]
    fn many_concurrent_clients_never_hold_one_lock_together() {
        let t = Arc::new(MemoryTables::with_tables(&["tf"]));
        let holders = Arc::new(AtomicUsize::new(0));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let grants = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..64)
            .map(|w| {
                let (t, holders, max_seen, grants) = (t.clone(), holders.clone(), max_seen.clone(), grants.clone());
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let me = format!("{w}-{i}");
                        if t.put("tf", lock("x", &me), Some(&Condition::NotExists("LockID".into()))).is_ok() {
                            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                            max_seen.fetch_max(now, Ordering::SeqCst);
                            grants.fetch_add(1, Ordering::SeqCst);
                            holders.fetch_sub(1, Ordering::SeqCst);
                            t.delete("tf", &lock("x", ""), Some(&Condition::Equals("Info".into(), json!({"S": me}))))
                                .expect("release own lock");
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().expect("thread");
        }
        assert_eq!(max_seen.load(Ordering::SeqCst), 1, "never two holders at once");
        assert!(grants.load(Ordering::SeqCst) > 0);
    }
}
