//! The in-memory key directory: where the latest record of every live item is, in the order of
//! its group, and which delete records (tombstones) still matter.
//!
//! Order: each item carries a `seq`, given when it first enters its group and kept by overwrites
//! and by compaction (which moves records, so file order cannot give list order). Recovery
//! replays records in file order and then sorts every group by `seq`.
//!
//! Tombstones: a delete record must stay on disk while an older `set` of its item does, or that
//! `set` would come back at the next start. `oldest` (per live item and per tombstone) is the
//! lowest segment that may still hold a `set` of the item; a tombstone in segment `t` is needed
//! while any segment in `oldest..t` exists. Needed tombstones count as live bytes.

use crate::{HashMap, Items, Streams};

/// Where a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub seg: u32,
    pub offset: u64,
    pub len: u32,
    pub value_len: u32,
}

impl Loc {
    /// Byte range of the value inside its segment.
    pub fn value_range(&self) -> std::ops::Range<usize> {
        let end = (self.offset + u64::from(self.len)) as usize;
        end - self.value_len as usize..end
    }
}

/// A live item.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub loc: Loc,
    pub seq: u64,
    pub oldest: u32,
}

/// A delete record that still hides older `set` records of its item.
#[derive(Debug, Clone, Copy)]
pub struct Tomb {
    pub loc: Loc,
    pub oldest: u32,
}

pub type Group = Items<Entry>;

#[derive(Default)]
pub struct Index {
    streams: Streams<Entry>,
    /// Keyed by `tomb_key`; only items that are absent from `streams`.
    tombs: HashMap<String, Tomb>,
}

/// One string per (stream, group, item), unambiguous whatever the names contain.
fn tomb_key(stream: &str, group: &str, item: &str) -> String {
    format!("{}:{}:{stream}{group}{item}", stream.len(), group.len())
}

impl Index {
    pub fn get(&self, stream: &str, group: &str, item: &str) -> Option<&Entry> {
        self.streams.get(stream)?.get(group)?.get(item)
    }

    pub fn get_mut(&mut self, stream: &str, group: &str, item: &str) -> Option<&mut Entry> {
        self.streams.get_mut(stream)?.get_mut(group)?.get_mut(item)
    }

    pub fn group(&self, stream: &str, group: &str) -> Option<&Group> {
        self.streams.get(stream)?.get(group)
    }

    /// Adds an item at the end of its group (the caller checked it is absent).
    pub fn insert(&mut self, stream: &str, group: &str, item: &str, entry: Entry) {
        crate::group_mut_or_create(&mut self.streams, stream, group).insert(item.to_owned(), entry);
    }

    /// Removes an item, closing the gap; emptied groups and streams go too.
    pub fn remove(&mut self, stream: &str, group: &str, item: &str) -> Option<Entry> {
        crate::remove_item(&mut self.streams, stream, group, item)
    }

    pub fn list_groups(&self, stream: &str) -> Vec<String> {
        crate::sorted_groups(&self.streams, stream)
    }

    pub fn list_streams(&self) -> Vec<(String, Vec<String>)> {
        crate::sorted_streams(&self.streams)
    }

    /// Every (stream, group) pair.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &str, &Group)> {
        self.streams.iter().flat_map(|(s, groups)| {
            groups
                .iter()
                .map(move |(g, items)| (s.as_str(), g.as_str(), items))
        })
    }

    /// Restores list order after recovery.
    pub fn sort_by_seq(&mut self) {
        for items in self.streams.values_mut().flat_map(|g| g.values_mut()) {
            items.sort_by(|_, a, _, b| a.seq.cmp(&b.seq));
        }
    }

    pub fn tomb(&self, stream: &str, group: &str, item: &str) -> Option<&Tomb> {
        if self.tombs.is_empty() {
            return None;
        }
        self.tombs.get(&tomb_key(stream, group, item))
    }

    pub fn tomb_mut(&mut self, stream: &str, group: &str, item: &str) -> Option<&mut Tomb> {
        if self.tombs.is_empty() {
            return None;
        }
        self.tombs.get_mut(&tomb_key(stream, group, item))
    }

    pub fn take_tomb(&mut self, stream: &str, group: &str, item: &str) -> Option<Tomb> {
        if self.tombs.is_empty() {
            return None;
        }
        self.tombs.remove(&tomb_key(stream, group, item))
    }

    pub fn put_tomb(&mut self, stream: &str, group: &str, item: &str, tomb: Tomb) -> Option<Tomb> {
        self.tombs.insert(tomb_key(stream, group, item), tomb)
    }

    /// Drops the tombstones for which `needed` says no; returns where they were.
    pub fn prune_tombs(&mut self, mut needed: impl FnMut(&mut Tomb) -> bool) -> Vec<Loc> {
        let mut dropped = Vec::new();
        self.tombs.retain(|_, tomb| {
            let keep = needed(tomb);
            if !keep {
                dropped.push(tomb.loc);
            }
            keep
        });
        dropped
    }

    #[cfg(test)]
    pub fn tomb_count(&self) -> usize {
        self.tombs.len()
    }
}
