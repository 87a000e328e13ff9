//! Room membership as one node keeps it: plain tables with no IO and no cluster logic.
//!
//! Every membership `(room, uid)` is known on two nodes: the room's owner keeps it in a
//! [`Table`] keyed by room (who to fan a room message out to), and the user's owner keeps it in
//! a [`Table`] keyed by uid (`welcome.rooms`, who may send to a room, `max_rooms_per_user`).
//! Each entry also remembers the node it was last announced to on the other side (`told`), so
//! that after a ring change only the entries whose other side moved are announced again
//! (see `crate::relay`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::engine::NodeId;

/// Estimated bytes of one entry beyond its string: the inner map's slot (an `Arc<str>` key and
/// an `Option<NodeId>` value, 32 bytes, at the table's load factor, up to half empty after
/// growing, and its control byte) and the key's `Arc` header (16 bytes). Measured by
/// `examples/room_memory.rs`: about 100 bytes in all for a room of 1000 members and an
/// 11-byte uid, so the gauge errs on the high side for small inner maps.
const ENTRY_BYTES: usize = 88;
/// Estimated bytes of one outer key beyond its string: its slot and an empty inner map.
const KEY_BYTES: usize = 96;

/// A two-level table of memberships: outer key (room or uid) to inner key (uid or room) to the
/// node last told about it.
#[derive(Debug, Default)]
pub struct Table {
    map: HashMap<Arc<str>, HashMap<Arc<str>, Option<NodeId>>>,
    entries: usize,
    bytes: usize,
}

impl Table {
    /// Whether `inner` is under `outer`.
    pub fn contains(&self, outer: &str, inner: &str) -> bool {
        self.map.get(outer).is_some_and(|m| m.contains_key(inner))
    }

    /// Entries under `outer`.
    pub fn count(&self, outer: &str) -> usize {
        self.map.get(outer).map_or(0, HashMap::len)
    }

    /// Adds `inner` under `outer` (or updates who was told). Returns the entries under `outer`
    /// now, or `None` when it is new and `outer` already has `max_inner` entries or the table
    /// `max_entries`.
    pub fn add(
        &mut self,
        outer: &Arc<str>,
        inner: &Arc<str>,
        told: Option<NodeId>,
        max_inner: usize,
        max_entries: usize,
    ) -> Option<usize> {
        if let Some(m) = self.map.get_mut(&**outer) {
            if let Some(t) = m.get_mut(&**inner) {
                if told.is_some() {
                    *t = told;
                }
                return Some(m.len());
            }
            if m.len() >= max_inner || self.entries >= max_entries {
                return None;
            }
            m.insert(inner.clone(), told);
            self.entries += 1;
            self.bytes += ENTRY_BYTES + inner.len();
            return Some(m.len());
        }
        if max_inner == 0 || self.entries >= max_entries {
            return None;
        }
        let mut m = HashMap::new();
        m.insert(inner.clone(), told);
        self.map.insert(outer.clone(), m);
        self.entries += 1;
        self.bytes += KEY_BYTES + outer.len() + ENTRY_BYTES + inner.len();
        Some(1)
    }

    /// Removes `inner` from under `outer`; an outer key left empty goes too. Whether it was
    /// there.
    pub fn remove(&mut self, outer: &str, inner: &str) -> bool {
        let Some(m) = self.map.get_mut(outer) else {
            return false;
        };
        if m.remove(inner).is_none() {
            return false;
        }
        self.entries -= 1;
        self.bytes -= ENTRY_BYTES + inner.len();
        if m.is_empty() {
            self.map.remove(outer);
            self.bytes -= KEY_BYTES + outer.len();
        }
        true
    }

    /// Removes `outer` with everything under it; returns the inner keys.
    pub fn take(&mut self, outer: &str) -> Vec<Arc<str>> {
        let Some(m) = self.map.remove(outer) else {
            return Vec::new();
        };
        self.entries -= m.len();
        self.bytes -= KEY_BYTES + outer.len();
        self.bytes -= m.keys().map(|k| ENTRY_BYTES + k.len()).sum::<usize>();
        let mut keys: Vec<Arc<str>> = m.into_keys().collect();
        keys.sort_unstable();
        keys
    }

    /// The inner keys under `outer`, sorted.
    pub fn inner(&self, outer: &str) -> Vec<Arc<str>> {
        let mut keys: Vec<Arc<str>> = self
            .map
            .get(outer)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort_unstable();
        keys
    }

    /// The inner keys under `outer` with who was told, unsorted (for a fan-out).
    pub fn entries_of(&self, outer: &str) -> Option<&HashMap<Arc<str>, Option<NodeId>>> {
        self.map.get(outer)
    }

    /// The entries under `outer` with who was told, sorted by inner key (a walk that changes
    /// the table as it goes).
    pub fn snapshot(&self, outer: &str) -> Vec<(Arc<str>, Option<NodeId>)> {
        let mut v: Vec<(Arc<str>, Option<NodeId>)> = self
            .map
            .get(outer)
            .map(|m| m.iter().map(|(k, t)| (k.clone(), t.clone())).collect())
            .unwrap_or_default();
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Sets who was told about `(outer, inner)`, if it is there.
    pub fn set_told(&mut self, outer: &str, inner: &str, told: Option<NodeId>) {
        if let Some(t) = self.map.get_mut(outer).and_then(|m| m.get_mut(inner)) {
            *t = told;
        }
    }

    /// The outer keys, sorted (a walk that must not depend on hash order).
    pub fn outer_keys(&self) -> Vec<Arc<str>> {
        let mut keys: Vec<Arc<str>> = self.map.keys().cloned().collect();
        keys.sort_unstable();
        keys
    }

    /// Entries, all outer keys together.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Outer keys.
    pub fn outer_len(&self) -> usize {
        self.map.len()
    }

    /// Estimated bytes of the table's state.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The ring key of a room: rooms and uids never collide.
pub fn room_key(room: &str) -> String {
    format!("room:{room}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn add_remove_take_keep_counts() {
        let mut t = Table::default();
        assert_eq!(t.add(&a("r"), &a("u1"), None, 2, 10), Some(1));
        assert_eq!(t.add(&a("r"), &a("u2"), Some(a("n1")), 2, 10), Some(2));
        // Again: no new entry, and within the bound.
        assert_eq!(t.add(&a("r"), &a("u2"), None, 2, 10), Some(2));
        assert_eq!(t.add(&a("r"), &a("u3"), None, 2, 10), None, "max_inner");
        assert_eq!(t.add(&a("s"), &a("u1"), None, 2, 2), None, "max_entries");
        assert_eq!((t.len(), t.outer_len(), t.count("r")), (2, 1, 2));
        assert!(t.contains("r", "u1") && !t.contains("r", "u3"));
        assert_eq!(t.entries_of("r").unwrap()["u2"].as_deref(), Some("n1"));
        let full = t.bytes();
        assert!(t.remove("r", "u1") && !t.remove("r", "u1"));
        assert!(t.bytes() < full);
        assert_eq!(t.take("r"), vec![a("u2")]);
        assert_eq!((t.len(), t.outer_len(), t.bytes()), (0, 0, 0));
        assert!(t.is_empty());
    }

    #[test]
    fn room_keys_do_not_collide_with_uids() {
        assert_eq!(room_key("x"), "room:x");
        assert_ne!(room_key("x"), "x");
    }
}
