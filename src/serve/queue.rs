//! Waiting jobs, in order. The server only talks to [`JobQueue`]; [`MemoryQueue`] keeps the
//! queue in this process. A shared backend (a Redis list with BLPOP for `pop`, LREM for
//! `remove`) implements the same five calls so several worker processes can take from one queue.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// `capacity` jobs are already waiting.
    Full { capacity: usize },
    /// The server is shutting down.
    Closed,
}

pub trait JobQueue: Send + Sync {
    /// Appends a job; returns its 1-based position.
    fn push(&self, id: &str) -> Result<usize, PushError>;
    /// Takes the next job, blocking while none waits; `None` once the queue is closed.
    fn pop(&self) -> Option<String>;
    /// Takes a waiting job out of the queue; false when it was not waiting.
    fn remove(&self, id: &str) -> bool;
    /// The waiting jobs, next first.
    fn waiting(&self) -> Vec<String>;
    /// Refuses new jobs and wakes blocked `pop`s; returns the jobs that were still waiting.
    fn close(&self) -> Vec<String>;
}

/// A bounded in-process queue.
pub struct MemoryQueue {
    capacity: usize,
    state: Mutex<QueueState>,
    available: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<String>,
    closed: bool,
}

impl MemoryQueue {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, state: Mutex::default(), available: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // The state is a plain list: still consistent if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl JobQueue for MemoryQueue {
    fn push(&self, id: &str) -> Result<usize, PushError> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed);
        }
        if s.jobs.len() >= self.capacity {
            return Err(PushError::Full { capacity: self.capacity });
        }
        s.jobs.push_back(id.to_string());
        self.available.notify_one();
        Ok(s.jobs.len())
    }

    fn pop(&self) -> Option<String> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(id) = s.jobs.pop_front() {
                return Some(id);
            }
            s = self.available.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn remove(&self, id: &str) -> bool {
        let mut s = self.lock();
        let before = s.jobs.len();
        s.jobs.retain(|j| j != id);
        s.jobs.len() != before
    }

    fn waiting(&self) -> Vec<String> {
        self.lock().jobs.iter().cloned().collect()
    }

    fn close(&self) -> Vec<String> {
        let mut s = self.lock();
        s.closed = true;
        self.available.notify_all();
        s.jobs.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bounded_fifo_with_remove_and_close() {
        let q = MemoryQueue::new(2);
        assert_eq!(q.push("a"), Ok(1));
        assert_eq!(q.push("b"), Ok(2));
        assert_eq!(q.push("c"), Err(PushError::Full { capacity: 2 }));
        assert!(q.remove("a"));
        assert!(!q.remove("a"));
        assert_eq!(q.push("c"), Ok(2));
        assert_eq!(q.waiting(), ["b", "c"]);
        assert_eq!(q.pop().as_deref(), Some("b"));
        assert_eq!(q.close(), ["c"]);
        assert_eq!(q.pop(), None);
        assert_eq!(q.push("d"), Err(PushError::Closed));
    }

    #[test]
    fn close_wakes_a_blocked_pop() {
        let q = Arc::new(MemoryQueue::new(1));
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || q.pop())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        q.close();
        assert_eq!(worker.join().unwrap(), None);
    }
}
