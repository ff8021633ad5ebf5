//! The per-user cap on concurrent agent requests (`agent.max_concurrent_per_user`).
//!
//! One `std::sync::Mutex<HashMap<user, open>>`, locked twice per agent request (once to take a
//! slot, once when the [`UserPermit`] is dropped) and never across an await: a request costs far
//! more than two uncontended lock operations, so sharding would buy nothing. An entry exists only
//! while its user has a request open (it is removed at zero), so the map is bounded by the
//! requests in flight, not by how many users ever called.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Counts open agent requests per user.
#[derive(Debug, Clone)]
pub struct UserLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `0` means no cap.
    limit: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open agent request of one user; dropping it frees the slot.
#[derive(Debug)]
pub struct UserPermit {
    inner: Arc<Inner>,
    user: String,
}

impl UserLimiter {
    /// A limiter allowing `limit` open requests per user (`0`: unlimited).
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                limit,
                open: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// A slot for `user`, or `None` when the user is at the cap. Without a cap, no slot is
    /// tracked at all (`Some(None)`).
    pub fn try_acquire(&self, user: &str) -> Option<Option<UserPermit>> {
        if self.inner.limit == 0 {
            return Some(None);
        }
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        match open.get_mut(user) {
            Some(n) if *n >= self.inner.limit => return None,
            Some(n) => *n += 1,
            None => {
                open.insert(user.to_owned(), 1);
            }
        }
        drop(open);
        Some(Some(UserPermit {
            inner: self.inner.clone(),
            user: user.to_owned(),
        }))
    }

    /// Open requests of `user` (for tests and diagnostics).
    pub fn open(&self, user: &str) -> usize {
        let open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(user).copied().unwrap_or(0)
    }

    /// Users with at least one open request.
    pub fn users(&self) -> usize {
        let open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        open.len()
    }
}

impl Drop for UserPermit {
    fn drop(&mut self) {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_user_and_forgets_idle_users() {
        let l = UserLimiter::new(2);
        let a1 = l.try_acquire("a").unwrap();
        let a2 = l.try_acquire("a").unwrap();
        assert!(l.try_acquire("a").is_none());
        let b1 = l.try_acquire("b").unwrap();
        assert_eq!((l.open("a"), l.open("b"), l.users()), (2, 1, 2));
        drop(a1);
        let a3 = l.try_acquire("a").unwrap();
        drop((a2, a3, b1));
        assert_eq!(l.users(), 0, "entries are removed at zero");
    }

    #[test]
    fn zero_means_unlimited() {
        let l = UserLimiter::new(0);
        let permits: Vec<_> = (0..100).map(|_| l.try_acquire("a").unwrap()).collect();
        assert!(permits.iter().all(Option::is_none));
        assert_eq!(l.users(), 0);
    }
}
