//! Long-lived tasks that outlive a tick (chat runners), owned by the runtime.
//!
//! A loop never spawns a task of its own: it starts one in a [`TaskSet`] taken from the
//! runtime's [`Supervisor`]. Each task gets its own child cancellation token (cancel one chat)
//! under the supervisor's token (cancel all at shutdown), is tracked (shutdown waits for it) and
//! is registered under a key while it runs, so another loop can list what runs here (the
//! heartbeat compares it with what the database says this worker owns) and no key ever runs
//! twice in one process.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a task was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("a task with this key is already running in this process")]
    AlreadyRunning,
    #[error("the worker is shutting down; no new task starts")]
    ShuttingDown,
}

/// Every long-lived task of the process: one tracker, one cancellation token.
#[derive(Clone, Default)]
pub struct Supervisor {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Supervisor {
    /// A keyed set of tasks (e.g. chat id → generation) supervised here.
    pub fn task_set<K, M>(&self, name: &'static str) -> TaskSet<K, M> {
        TaskSet {
            name,
            supervisor: self.clone(),
            entries: Arc::new(Mutex::new(HashMap::new())),
            next_id: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Shutdown: cancel every task and start no new one.
    pub fn cancel_all(&self) {
        self.cancel.cancel();
        self.tracker.close();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves once [`Supervisor::cancel_all`] was called and every task has ended.
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// Tasks running now.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

struct Entry<M> {
    /// Tells this entry from a later task under the same key (only its own task removes it).
    id: u64,
    meta: M,
    cancel: CancellationToken,
}

/// Tasks keyed by `K`, each carrying metadata `M` the owner wants to read back (a generation).
pub struct TaskSet<K, M> {
    name: &'static str,
    supervisor: Supervisor,
    entries: Arc<Mutex<HashMap<K, Entry<M>>>>,
    next_id: Arc<AtomicU64>,
}

impl<K, M> Clone for TaskSet<K, M> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            supervisor: self.supervisor.clone(),
            entries: self.entries.clone(),
            next_id: self.next_id.clone(),
        }
    }
}

impl<K, M> TaskSet<K, M>
where
    K: Eq + Hash + Clone + Send + 'static,
    M: Clone + Send + 'static,
{
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry<M>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `task(token)` under `key`. The token fires on [`TaskSet::cancel`] of this key, on
    /// [`TaskSet::cancel_all`] and at shutdown; the key is free again once the task has ended
    /// (however it ends: return, panic).
    pub fn start<F, Fut>(&self, key: K, meta: M, task: F) -> Result<(), StartError>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.supervisor.is_shutting_down() {
            return Err(StartError::ShuttingDown);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.supervisor.cancel.child_token();
        {
            let mut entries = self.lock();
            if entries.contains_key(&key) {
                return Err(StartError::AlreadyRunning);
            }
            entries.insert(key.clone(), Entry { id, meta, cancel: cancel.clone() });
        }
        let registration = Registration { entries: self.entries.clone(), key, id };
        let future = task(cancel);
        self.supervisor.tracker.spawn(async move {
            let _registration = registration;
            future.await;
        });
        Ok(())
    }

    /// Cancels the task under `key`; false if none runs.
    pub fn cancel(&self, key: &K) -> bool {
        match self.lock().get(key) {
            Some(entry) => {
                entry.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every task of this set (not of the other sets).
    pub fn cancel_all(&self) {
        self.lock().values().for_each(|entry| entry.cancel.cancel());
    }

    /// What runs now, with its metadata (cancelled tasks that have not ended yet included).
    pub fn snapshot(&self) -> Vec<(K, M)> {
        self.lock().iter().map(|(k, e)| (k.clone(), e.meta.clone())).collect()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.lock().contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Removes a task's entry when the task ends, even by panic.
struct Registration<K: Eq + Hash, M> {
    entries: Arc<Mutex<HashMap<K, Entry<M>>>>,
    key: K,
    id: u64,
}

impl<K: Eq + Hash, M> Drop for Registration<K, M> {
    fn drop(&mut self) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.get(&self.key).is_some_and(|e| e.id == self.id) {
            entries.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn a_key_runs_once_and_is_free_again_when_its_task_ends() {
        let supervisor = Supervisor::default();
        let set: TaskSet<u32, i64> = supervisor.task_set("test");
        let (release, released) = oneshot::channel::<()>();
        let (ended_tx, ended) = oneshot::channel::<()>();
        set.start(1, 7, |_| async move {
            let _ = released.await;
            let _ = ended_tx.send(());
        })
        .expect("starts");
        assert_eq!(set.start(1, 8, |_| async {}), Err(StartError::AlreadyRunning));
        assert_eq!(set.snapshot(), vec![(1, 7)]);
        release.send(()).expect("task alive");
        ended.await.expect("task ended");
        supervisor.cancel_all();
        supervisor.wait().await;
        assert!(set.is_empty(), "the entry left with its task");
    }

    #[tokio::test]
    async fn cancel_reaches_one_task_and_shutdown_reaches_all_and_is_awaited() {
        let supervisor = Supervisor::default();
        let set: TaskSet<u32, ()> = supervisor.task_set("test");
        let (a_done_tx, a_done) = oneshot::channel();
        set.start(1, (), |token| async move {
            token.cancelled().await;
            let _ = a_done_tx.send(());
        })
        .expect("a");
        set.start(2, (), |token| async move { token.cancelled().await }).expect("b");
        assert!(set.cancel(&1));
        a_done.await.expect("a saw its own cancellation");
        assert!(set.contains(&2), "b was not cancelled");
        supervisor.cancel_all();
        supervisor.wait().await;
        assert!(set.is_empty());
        assert_eq!(set.start(3, (), |_| async {}), Err(StartError::ShuttingDown));
    }
}
