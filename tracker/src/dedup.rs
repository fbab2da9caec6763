//! Duplicate detection for retried batches. The filter keeps an event's id when it
//! resends a batch whose answer it never got, so an id seen recently means "already
//! counted". Memory must stay bounded, so only the last `capacity` ids are remembered
//! (first in, first out): a copy that arrives after `capacity` newer events is counted
//! again. With the default window of 100 000 ids and ids of about 40 bytes this costs
//! roughly 10 MB.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

#[derive(Debug)]
pub struct DedupWindow {
    capacity: usize,
    order: VecDeque<Arc<str>>,
    seen: HashSet<Arc<str>>,
}

impl DedupWindow {
    /// A window of `capacity` ids; 0 turns duplicate detection off.
    pub fn new(capacity: usize) -> Self {
        DedupWindow { capacity, order: VecDeque::new(), seen: HashSet::new() }
    }

    /// Records `id`; true when it was not in the window (the event is new).
    pub fn insert(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.capacity == 0 {
            return true;
        }
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back(Arc::clone(&id));
        self.seen.insert(id);
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_window_and_forgets_oldest() {
        let mut window = DedupWindow::new(2);
        assert!(window.insert("a"));
        assert!(!window.insert("a"));
        assert!(window.insert("b"));
        assert!(window.insert("c")); // evicts "a"
        assert_eq!(window.len(), 2);
        assert!(!window.insert("b"));
        assert!(!window.insert("c"));
        assert!(window.insert("a")); // forgotten, so counted again
    }

    #[test]
    fn zero_capacity_disables() {
        let mut window = DedupWindow::new(0);
        assert!(window.insert("a"));
        assert!(window.insert("a"));
        assert!(window.is_empty());
    }
}
