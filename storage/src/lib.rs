//! Storage for ringcast streams: the `KvStore` trait that each shard's store implements, the
//! in-memory adapter, and the memory-mapped file store.
//!
//! Items are kept as their JSON text (`Json`), so snapshots, `list` results and subscriber
//! frames splice stored values in verbatim instead of re-serialising them.

pub mod file;
pub mod memory;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// A stored item: the JSON text of its value (object keys sorted, as serde_json writes them).
pub type Json = Arc<str>;

/// Why a store refused a write (or, for a failed store, a read). `Display` is the text that
/// `stream::*` results carry under `STREAM_STORE_ERROR`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record format cannot hold this write: a name or the value is too long.
    #[error(transparent)]
    TooLarge(#[from] file::FormatError),
    /// A file operation of the store in `dir` failed; the store is unchanged and still serves.
    #[error("file store {}: {source}", dir.display())]
    Io { dir: PathBuf, #[source] source: io::Error },
    /// Fail-stop: an `fdatasync` of the store in `dir` failed (`why`), so it serves nothing
    /// more until the engine restarts (see `file::sync`).
    #[error("file store {} failed ({why}) and serves nothing more; restart the engine", dir.display())]
    Failed { dir: PathBuf, why: String },
    /// Compaction met a damaged record in `file`; the segment is left as it is.
    #[error("compaction found a corrupt record in {} at byte offset {offset}", file.display())]
    Corrupt { file: PathBuf, offset: u64 },
    /// Re-homing was given an owner index `to` past the stores it was given.
    #[error("re-homing: no store {to} for {stream}/{group}")]
    NoOwner { to: usize, stream: String, group: String },
}

/// The store of one shard: `stream -> group -> item -> value`, groups keeping the insertion order
/// of their items (an overwrite keeps the position, a delete closes the gap). A group whose last
/// item is deleted disappears.
pub trait KvStore {
    fn get(&self, stream: &str, group: &str, item: &str) -> Option<Json>;
    /// Stores `value`; returns the previous value.
    fn set(&mut self, stream: &str, group: &str, item: &str, value: Json) -> Result<Option<Json>, StoreError>;
    /// Removes the item; returns the removed value.
    fn delete(&mut self, stream: &str, group: &str, item: &str) -> Result<Option<Json>, StoreError>;
    /// Values of a group in order; empty for a missing group.
    fn list(&self, stream: &str, group: &str) -> Vec<Json>;
    /// Groups of a stream that hold at least one item, sorted.
    fn list_groups(&self, stream: &str) -> Vec<String>;
    /// Every stream with its non-empty groups, both sorted.
    fn list_streams(&self) -> Vec<(String, Vec<String>)>;
    /// Whether the store still serves reads and writes; a file store stops for good after a
    /// failed `fdatasync` (fail-stop, see `file::sync`), and its callers must then not serve
    /// what `get` and `list` return.
    fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Hashing of the stores' maps: foldhash, several times faster than the standard SipHash on
/// short names and still seeded per process.
pub(crate) type Hashing = foldhash::fast::RandomState;
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, Hashing>;
/// Items of one group, in insertion order.
pub(crate) type Items<V> = indexmap::IndexMap<String, V, Hashing>;
/// `stream -> group -> items`, as both stores index them.
pub(crate) type Streams<V> = HashMap<String, HashMap<String, Items<V>>>;

/// The items of a group, created (with its stream) if missing. Keys are only allocated on
/// creation, so writes to existing groups do not allocate.
pub(crate) fn group_mut_or_create<'a, V>(streams: &'a mut Streams<V>, stream: &str, group: &str) -> &'a mut Items<V> {
    if !streams.contains_key(stream) {
        streams.insert(stream.to_owned(), HashMap::default());
    }
    let groups = streams.get_mut(stream).expect("stream just ensured");
    if !groups.contains_key(group) {
        groups.insert(group.to_owned(), Items::default());
    }
    groups.get_mut(group).expect("group just ensured")
}

/// Removes an item, closing the gap (`shift_remove` keeps the others in order); emptied groups
/// and streams go too, so listings only show groups that hold items.
pub(crate) fn remove_item<V>(streams: &mut Streams<V>, stream: &str, group: &str, item: &str) -> Option<V> {
    let groups = streams.get_mut(stream)?;
    let items = groups.get_mut(group)?;
    let removed = items.shift_remove(item);
    if items.is_empty() {
        groups.remove(group);
        if groups.is_empty() {
            streams.remove(stream);
        }
    }
    removed
}

/// The groups of `stream`, sorted.
pub(crate) fn sorted_groups<V>(streams: &Streams<V>, stream: &str) -> Vec<String> {
    let mut names: Vec<String> = streams.get(stream).map(|g| g.keys().cloned().collect()).unwrap_or_default();
    names.sort_unstable();
    names
}

/// Every stream with its groups, both sorted.
pub(crate) fn sorted_streams<V>(streams: &Streams<V>) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> =
        streams.keys().map(|name| (name.clone(), sorted_groups(streams, name))).collect();
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    out
}
