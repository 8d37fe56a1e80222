//! Tables keyed by `(namespace, id)`, as functions, trigger types and worker names are.

use std::collections::HashMap;

/// The namespace used when a message names none.
pub const DEFAULT_NS: &str = "default";

/// A two-level map `namespace -> id -> T`, so lookups take `&str` without allocating.
#[derive(Debug)]
pub struct NsMap<T> {
    inner: HashMap<String, HashMap<String, T>>,
}

impl<T> Default for NsMap<T> {
    fn default() -> Self {
        NsMap { inner: HashMap::new() }
    }
}

impl<T> NsMap<T> {
    pub fn get(&self, ns: &str, id: &str) -> Option<&T> {
        self.inner.get(ns)?.get(id)
    }

    pub fn insert(&mut self, ns: &str, id: &str, value: T) -> Option<T> {
        self.inner.entry(ns.to_string()).or_default().insert(id.to_string(), value)
    }

    pub fn remove(&mut self, ns: &str, id: &str) -> Option<T> {
        let table = self.inner.get_mut(ns)?;
        let removed = table.remove(id);
        if table.is_empty() {
            self.inner.remove(ns);
        }
        removed
    }

    /// Every `(namespace, id, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &T)> {
        self.inner
            .iter()
            .flat_map(|(ns, table)| table.iter().map(move |(id, v)| (ns.as_str(), id.as_str(), v)))
    }

    /// Namespaces other than `ns` that hold `id`, sorted.
    pub fn namespaces_holding(&self, id: &str, except: &str) -> Vec<String> {
        let mut found: Vec<String> = self
            .inner
            .iter()
            .filter(|(ns, table)| ns.as_str() != except && table.contains_key(id))
            .map(|(ns, _)| ns.clone())
            .collect();
        found.sort();
        found
    }
}

/// `(namespace, id)` as stored in per-connection ownership sets.
pub type NsKey = (String, String);

pub fn ns_key(ns: &str, id: &str) -> NsKey {
    (ns.to_string(), id.to_string())
}

/// A present namespace that is empty or whitespace-only is refused (spec §2.6).
pub fn is_blank(ns: &Option<String>) -> bool {
    matches!(ns, Some(s) if s.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove_prunes_empty_namespaces() {
        let mut map = NsMap::default();
        map.insert("a", "x", 1);
        map.insert("b", "x", 2);
        assert_eq!(map.get("a", "x"), Some(&1));
        assert_eq!(map.namespaces_holding("x", "a"), vec!["b".to_string()]);
        assert_eq!(map.remove("a", "x"), Some(1));
        assert!(map.get("a", "x").is_none());
        assert_eq!(map.iter().count(), 1);
    }

    #[test]
    fn blank_namespace_detection() {
        assert!(is_blank(&Some("  ".into())));
        assert!(!is_blank(&None));
        assert!(!is_blank(&Some("orders".into())));
    }
}
