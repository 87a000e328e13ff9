//! Kicks: `POST /api/kick` revokes every token of a uid issued up to the kick, cluster-wide.
//!
//! A kick is `(uid, at)`, `at` in unix seconds: tokens of `uid` whose `iat <= at` are refused
//! from then on. Every node keeps a table of kicks, and gossips each kick it knows under its
//! own key `kick:<uid>` = `at`. A node that learns a kick from gossip records it and gossips it
//! too, so a kick outlives the node that took it, and a node that joins (or takes a user over)
//! later learns every kick from any member's state.
//!
//! A kick is remembered only while the tokens it revokes could still be valid: every token this
//! cluster accepts lives at most `auth.token_ttl_s` + `auth.leeway_s` after its `iat`, and the
//! clocks may differ by the leeway, so a kick is kept for `token_ttl_s` + 2 × `leeway_s`. The
//! table holds at most `auth.max_kicks` kicks; a kick beyond that is refused (the API answers
//! 503 `busy`) rather than forgetting an older one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Gossip key prefix of a kick; the rest of the key is the uid, the value `at`.
pub const KEY_PREFIX: &str = "kick:";

/// Why a kick was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KickError {
    /// The table holds `auth.max_kicks` kicks.
    #[error("too many kicks remembered at once")]
    Full,
}

/// The kicks this node knows, with the ones not yet acted on.
#[derive(Debug)]
pub struct Kicks {
    inner: Mutex<Inner>,
    keep_s: u64,
    max: usize,
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Inner {
    by_uid: HashMap<Arc<str>, u64>,
    /// Kicks recorded but not yet gossiped by this node and applied to its sessions.
    fresh: HashMap<Arc<str>, u64>,
}

impl Kicks {
    /// A table keeping each kick `keep_s` seconds, at most `max` at once.
    pub fn new(keep_s: u64, max: usize) -> Kicks {
        Kicks {
            inner: Mutex::new(Inner::default()),
            keep_s,
            max,
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Records that tokens of `uid` issued up to `at` are revoked. Returns `true` if this is
    /// news (no kick of `uid`, or an earlier one); news is queued for [`Kicks::take_fresh`].
    /// A kick already past its keeping time (at `now`) is ignored.
    ///
    /// # Errors
    /// [`KickError::Full`] when the table is full of other uids' kicks.
    pub fn record(&self, uid: &str, at: u64, now: u64) -> Result<bool, KickError> {
        if at.saturating_add(self.keep_s) < now {
            return Ok(false);
        }
        let mut inner = self.inner.lock().expect("kicks lock");
        let key: Arc<str> = match inner.by_uid.get_key_value(uid) {
            Some((k, &known)) => {
                if known >= at {
                    return Ok(false);
                }
                k.clone()
            }
            None => {
                if inner.by_uid.len() >= self.max {
                    return Err(KickError::Full);
                }
                Arc::from(uid)
            }
        };
        inner.by_uid.insert(key.clone(), at);
        inner.fresh.insert(key, at);
        drop(inner);
        self.changed.notify_one();
        Ok(true)
    }

    /// Whether a token of `uid` issued at `iat` is revoked.
    pub fn revokes(&self, uid: &str, iat: u64) -> bool {
        self.inner
            .lock()
            .expect("kicks lock")
            .by_uid
            .get(uid)
            .is_some_and(|&at| iat <= at)
    }

    /// The kicks recorded since the last call.
    pub fn take_fresh(&self) -> Vec<(Arc<str>, u64)> {
        let mut inner = self.inner.lock().expect("kicks lock");
        inner.fresh.drain().collect()
    }

    /// Forgets kicks past their keeping time at `now`; returns their uids.
    pub fn expire(&self, now: u64) -> Vec<Arc<str>> {
        let mut inner = self.inner.lock().expect("kicks lock");
        let keep = self.keep_s;
        let gone: Vec<Arc<str>> = inner
            .by_uid
            .iter()
            .filter(|(_, at)| at.saturating_add(keep) < now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            inner.by_uid.remove(k);
            inner.fresh.remove(k);
        }
        gone
    }

    /// Kicks remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("kicks lock").by_uid.len()
    }

    /// Whether no kick is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when a kick was recorded since the last [`Kicks::take_fresh`] (or spuriously).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kick_revokes_tokens_issued_up_to_it_for_as_long_as_they_live() {
        let k = Kicks::new(100, 10);
        assert!(k.record("bob", 1000, 1000).unwrap());
        assert!(k.revokes("bob", 999));
        assert!(k.revokes("bob", 1000));
        assert!(!k.revokes("bob", 1001));
        assert!(!k.revokes("alice", 10));
        // Known or older news is not news; a later kick is.
        assert!(!k.record("bob", 1000, 1000).unwrap());
        assert!(!k.record("bob", 900, 1000).unwrap());
        assert_eq!(k.take_fresh(), vec![(Arc::from("bob"), 1000)]);
        assert!(k.take_fresh().is_empty());
        assert!(k.record("bob", 1005, 1005).unwrap());
        assert!(k.revokes("bob", 1003));
        // Kept exactly keep_s after `at`, then forgotten.
        assert!(k.expire(1105).is_empty());
        assert_eq!(k.expire(1106), vec![Arc::<str>::from("bob")]);
        assert!(!k.revokes("bob", 1003));
        // A kick learnt after its keeping time is ignored.
        assert!(!k.record("carol", 10, 1000).unwrap());
        assert!(k.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_never_forgets_to_make_room() {
        let k = Kicks::new(100, 2);
        k.record("a", 10, 10).unwrap();
        k.record("b", 10, 10).unwrap();
        assert_eq!(k.record("c", 10, 10), Err(KickError::Full));
        // A later kick of a known uid still fits.
        assert!(k.record("a", 11, 11).unwrap());
        assert!(k.revokes("a", 11) && k.revokes("b", 10) && !k.revokes("c", 1));
        assert_eq!(k.len(), 2);
    }
}
