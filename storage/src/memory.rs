//! The in-memory store: `stream -> group -> ordered items`.
//!
//! Streams and groups are nested maps rather than one map keyed by `"stream:<s>:<g>"`, so names
//! may contain `:` (or anything else) without one stream's groups leaking into another's listing.
//! Emptied groups and streams are dropped at once, so listings only ever show groups that hold
//! items (the reference kv adapter keeps emptied groups listed until restart).

use std::mem;

use crate::{Items, Json, KvStore, StoreError, Streams};

/// Items of one group in insertion order of their first write.
type Group = Items<Json>;

/// An in-memory [`KvStore`]; nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    streams: Streams<Json>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn group(&self, stream: &str, group: &str) -> Option<&Group> {
        self.streams.get(stream)?.get(group)
    }

    /// Drops a whole group (the `redis` adapter's mirror of a group nobody subscribes to).
    pub fn remove_group(&mut self, stream: &str, group: &str) {
        if let Some(groups) = self.streams.get_mut(stream) {
            groups.remove(group);
            if groups.is_empty() {
                self.streams.remove(stream);
            }
        }
    }

    /// `(item id, value)` of a group, in order.
    pub fn items(&self, stream: &str, group: &str) -> Vec<(String, Json)> {
        self.group(stream, group).map(|items| items.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

}

impl KvStore for MemoryStore {
    fn get(&self, stream: &str, group: &str, item: &str) -> Option<Json> {
        self.group(stream, group)?.get(item).cloned()
    }

    fn set(
        &mut self,
        stream: &str,
        group: &str,
        item: &str,
        value: Json,
    ) -> Result<Option<Json>, StoreError> {
        let items = crate::group_mut_or_create(&mut self.streams, stream, group);
        // Overwrite in place: keeps the item's list position and avoids allocating its key again.
        if let Some(slot) = items.get_mut(item) {
            return Ok(Some(mem::replace(slot, value)));
        }
        items.insert(item.to_owned(), value);
        Ok(None)
    }

    fn delete(&mut self, stream: &str, group: &str, item: &str) -> Result<Option<Json>, StoreError> {
        Ok(crate::remove_item(&mut self.streams, stream, group, item))
    }

    fn list(&self, stream: &str, group: &str) -> Vec<Json> {
        self.group(stream, group)
            .map(|items| items.values().cloned().collect())
            .unwrap_or_default()
    }

    fn list_groups(&self, stream: &str) -> Vec<String> {
        crate::sorted_groups(&self.streams, stream)
    }

    fn list_streams(&self) -> Vec<(String, Vec<String>)> {
        crate::sorted_streams(&self.streams)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Json {
        Json::from(s)
    }

    fn texts(values: Vec<Json>) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn get_missing_is_none() {
        let store = MemoryStore::new();
        assert_eq!(store.get("s", "g", "i"), None);
        assert!(store.list("s", "g").is_empty());
        assert!(store.list_groups("s").is_empty());
        assert!(store.list_streams().is_empty());
    }

    #[test]
    fn set_returns_previous_and_get_reads_back() {
        let mut store = MemoryStore::new();
        assert_eq!(store.set("s", "g", "i", j("1")).unwrap(), None);
        assert_eq!(store.get("s", "g", "i").as_deref(), Some("1"));
        assert_eq!(store.set("s", "g", "i", j("2")).unwrap().as_deref(), Some("1"));
        assert_eq!(store.get("s", "g", "i").as_deref(), Some("2"));
    }

    #[test]
    fn stored_null_counts_as_existing() {
        let mut store = MemoryStore::new();
        store.set("s", "g", "i", j("null")).unwrap();
        assert_eq!(store.set("s", "g", "i", j("3")).unwrap().as_deref(), Some("null"));
    }

    #[test]
    fn list_keeps_first_write_order_and_overwrite_keeps_position() {
        let mut store = MemoryStore::new();
        for (id, v) in [("c", "1"), ("a", "2"), ("b", "3")] {
            store.set("s", "g", id, j(v)).unwrap();
        }
        store.set("s", "g", "c", j("9")).unwrap();
        assert_eq!(texts(store.list("s", "g")), ["9", "2", "3"]);
    }

    #[test]
    fn delete_closes_the_gap() {
        let mut store = MemoryStore::new();
        for (id, v) in [("x", "1"), ("y", "2"), ("z", "3")] {
            store.set("s", "g", id, j(v)).unwrap();
        }
        assert_eq!(store.delete("s", "g", "x").unwrap().as_deref(), Some("1"));
        assert_eq!(texts(store.list("s", "g")), ["2", "3"]);
        // A re-inserted item goes to the end.
        store.set("s", "g", "x", j("4")).unwrap();
        assert_eq!(texts(store.list("s", "g")), ["2", "3", "4"]);
    }

    #[test]
    fn delete_missing_returns_none() {
        let mut store = MemoryStore::new();
        assert_eq!(store.delete("s", "g", "i").unwrap(), None);
        store.set("s", "g", "i", j("1")).unwrap();
        assert_eq!(store.delete("s", "g", "other").unwrap(), None);
        assert_eq!(store.delete("s", "other", "i").unwrap(), None);
        assert_eq!(store.list_groups("s"), ["g"]);
    }

    #[test]
    fn emptied_group_and_stream_disappear() {
        let mut store = MemoryStore::new();
        store.set("s", "g1", "i", j("1")).unwrap();
        store.set("s", "g2", "i", j("2")).unwrap();
        store.delete("s", "g1", "i").unwrap();
        assert_eq!(store.list_groups("s"), ["g2"]);
        assert!(store.list("s", "g1").is_empty());
        assert_eq!(store.list_streams(), [("s".to_owned(), vec!["g2".to_owned()])]);
        store.delete("s", "g2", "i").unwrap();
        assert!(store.list_groups("s").is_empty());
        assert!(store.list_streams().is_empty());
        assert!(store.streams.is_empty());
    }

    #[test]
    fn listings_are_sorted() {
        let mut store = MemoryStore::new();
        for (s, g) in [
            ("zeta", "b"),
            ("alpha", "z"),
            ("alpha", "a"),
            ("zeta", "a"),
            ("mid", "m"),
        ] {
            store.set(s, g, "i", j("1")).unwrap();
        }
        assert_eq!(store.list_groups("alpha"), ["a", "z"]);
        let all = store.list_streams();
        let names: Vec<&str> = all.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        assert_eq!(all[0].1, ["a", "z"]);
        assert_eq!(all[2].1, ["a", "b"]);
    }

    #[test]
    fn colons_in_names_do_not_leak_between_streams() {
        let mut store = MemoryStore::new();
        store.set("a:b", "c", "i", j("1")).unwrap();
        store.set("a", "b:c", "i", j("2")).unwrap();
        assert_eq!(store.list_groups("a"), ["b:c"]);
        assert_eq!(store.list_groups("a:b"), ["c"]);
        assert_eq!(store.get("a:b", "c", "i").as_deref(), Some("1"));
        assert_eq!(store.get("a", "b:c", "i").as_deref(), Some("2"));
        assert_eq!(
            store.list_streams(),
            [
                ("a".to_owned(), vec!["b:c".to_owned()]),
                ("a:b".to_owned(), vec!["c".to_owned()])
            ]
        );
    }

    #[test]
    fn odd_names_are_plain_keys() {
        let mut store = MemoryStore::new();
        for name in ["", "*", "a?[b]", "ünï cødé", "stream:x:y"] {
            store.set(name, name, name, j("true")).unwrap();
            assert_eq!(store.get(name, name, name).as_deref(), Some("true"));
            assert_eq!(store.list_groups(name), [name]);
        }
        assert_eq!(store.list_streams().len(), 5);
    }

    #[test]
    fn groups_are_independent() {
        let mut store = MemoryStore::new();
        store.set("s", "g1", "i", j("1")).unwrap();
        store.set("s", "g2", "i", j("2")).unwrap();
        store.set("t", "g1", "i", j("3")).unwrap();
        assert_eq!(texts(store.list("s", "g1")), ["1"]);
        assert_eq!(texts(store.list("s", "g2")), ["2"]);
        assert_eq!(texts(store.list("t", "g1")), ["3"]);
    }
}
