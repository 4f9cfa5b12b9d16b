//! Long-lived tasks that outlive a tick (chat runners), owned by the runtime.
//!
//! A loop never spawns a task of its own: it starts one in a [`TaskSet`] taken from the
//! runtime's [`Supervisor`]. Each task gets a [`StopSignal`], raised for it alone with a cause
//! ([`TaskSet::stop`]) or for every task at shutdown (with the set's shutdown cause); it is
//! tracked (shutdown waits for it) and registered under a key while it runs, so another loop can
//! list what runs here (the heartbeat compares it with what the database says this worker owns)
//! and no key ever runs twice in one process.
//!
//! A worker may hold 100k chats, so a registered task costs its tokio task, one map entry and one
//! small allocation (the signal: a waker slot and the cause cell), and nothing per task elsewhere:
//! no child token in a shared tree, no second allocation for the cause (BENCHMARKS.md, chats).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::Poll;

use futures_util::FutureExt;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// Why a task was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("a task with this key is already running in this process")]
    AlreadyRunning,
    #[error("the worker is shutting down; no new task starts")]
    ShuttingDown,
}

/// Every long-lived task of the process: one tracker, one shutdown switch over every set.
#[derive(Clone, Default)]
pub struct Supervisor {
    tracker: TaskTracker,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    shutting_down: AtomicBool,
    /// Every live task set made here, so that shutdown reaches each of their tasks.
    sets: Mutex<Vec<Weak<dyn ShutDown>>>,
}

/// A task set as the supervisor sees it at shutdown.
trait ShutDown: Send + Sync {
    fn shut_down(&self);
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under these locks leaves plain data behind (no invariant half-written).
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Supervisor {
    /// A keyed set of tasks (e.g. chat id → generation) supervised here; `shutdown_cause` is
    /// what its tasks' signals carry when they are stopped by shutdown.
    pub fn task_set<K, M, C>(&self, name: &'static str, shutdown_cause: C) -> TaskSet<K, M, C>
    where
        K: Eq + Hash + Clone + Send + 'static,
        M: Clone + Send + 'static,
        C: Clone + Send + Sync + 'static,
    {
        let set = Arc::new(SetInner {
            name,
            shutdown_cause,
            entries: Mutex::new(HashMap::new()),
            ended: Arc::default(),
        });
        let mut sets = locked(&self.shared.sets);
        sets.retain(|set| set.strong_count() > 0);
        sets.push(Arc::downgrade(&set) as Weak<dyn ShutDown>);
        drop(sets);
        TaskSet { set, supervisor: self.clone() }
    }

    /// Shutdown: stop every task of every set and start no new one.
    pub fn cancel_all(&self) {
        // The flag first: a start that takes a set's lock after this set's pass below sees it
        // and refuses; one that took it before is registered (and counted by the tracker), so
        // the pass stops it. The tracker closes last, so a drain that sees it closed also sees
        // every task that was started.
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let sets: Vec<_> = locked(&self.shared.sets).iter().filter_map(Weak::upgrade).collect();
        for set in sets {
            set.shut_down();
        }
        self.tracker.close();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
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

/// A task's stop signal: raised once, with the cause of the first raise. Only its task holds
/// it, and it has one waiter at a time (`stopped` takes `&mut self`), so waiting costs one
/// registered waker, not a waiter list: the task's future stays small (BENCHMARKS.md, chats).
pub struct StopSignal<C> {
    shared: Arc<Signal<C>>,
}

struct Signal<C> {
    cause: OnceLock<C>,
    waker: AtomicWaker,
}

impl<C> Signal<C> {
    /// Raises the signal; a later raise changes nothing (the first cause is the one reported).
    fn raise(&self, cause: C) {
        if self.cause.set(cause).is_ok() {
            self.waker.wake();
        }
    }
}

impl<C: Clone> StopSignal<C> {
    pub fn is_stopped(&self) -> bool {
        self.shared.cause.get().is_some()
    }

    /// Why the task was told to stop; `None` while it was not.
    pub fn cause(&self) -> Option<C> {
        self.shared.cause.get().cloned()
    }

    /// Resolves once the signal is raised (at once if it already was).
    pub fn stopped(&mut self) -> impl Future<Output = ()> + Send + '_
    where
        C: Send + Sync,
    {
        std::future::poll_fn(|cx| {
            if self.is_stopped() {
                return Poll::Ready(());
            }
            self.shared.waker.register(cx.waker());
            // A raise between the check and the registration woke no one: check again.
            if self.is_stopped() { Poll::Ready(()) } else { Poll::Pending }
        })
    }
}

struct Entry<M, C> {
    meta: M,
    /// Also tells this entry from a later task's under the same key (only its own task
    /// removes it).
    signal: Arc<Signal<C>>,
}

struct SetInner<K, M, C> {
    name: &'static str,
    shutdown_cause: C,
    entries: Mutex<HashMap<K, Entry<M, C>>>,
    /// Notified after a task's entry is removed ([`TaskSet::ended`]).
    ended: Arc<Notify>,
}

impl<K, M, C> ShutDown for SetInner<K, M, C>
where
    K: Send,
    M: Send,
    C: Clone + Send + Sync,
{
    fn shut_down(&self) {
        for entry in locked(&self.entries).values() {
            entry.signal.raise(self.shutdown_cause.clone());
        }
    }
}

/// Tasks keyed by `K`, each carrying metadata `M` the owner wants to read back (a generation),
/// stopped with a cause `C`.
pub struct TaskSet<K, M, C> {
    set: Arc<SetInner<K, M, C>>,
    supervisor: Supervisor,
}

impl<K, M, C> Clone for TaskSet<K, M, C> {
    fn clone(&self) -> Self {
        Self { set: self.set.clone(), supervisor: self.supervisor.clone() }
    }
}

impl<K, M, C> TaskSet<K, M, C>
where
    K: Eq + Hash + Clone + Send + 'static,
    M: Clone + Send + 'static,
    C: Clone + Send + Sync + 'static,
{
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry<M, C>>> {
        locked(&self.set.entries)
    }

    /// Starts `task(signal)` under `key`. The signal is raised by [`TaskSet::stop`] of this key,
    /// by [`TaskSet::stop_all`] and at shutdown; the key is free again once the task has ended
    /// (however it ends: return, panic).
    pub fn start<F, Fut>(&self, key: K, meta: M, task: F) -> Result<(), StartError>
    where
        F: FnOnce(StopSignal<C>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let signal = Arc::new(Signal { cause: OnceLock::new(), waker: AtomicWaker::new() });
        let tracked = {
            let mut entries = self.lock();
            // Checked under the set's lock; see `Supervisor::cancel_all`.
            if self.supervisor.is_shutting_down() {
                return Err(StartError::ShuttingDown);
            }
            if entries.contains_key(&key) {
                return Err(StartError::AlreadyRunning);
            }
            entries.insert(key.clone(), Entry { meta, signal: signal.clone() });
            // Counted before shutdown's pass can see the entry, so the drain waits for it.
            self.supervisor.tracker.token()
        };
        let registration =
            Registration { set: self.set.clone(), key, signal: signal.clone(), _tracked: tracked };
        // `map` keeps the future and the registration side by side in one small future (an
        // `async` block would hold a second slot for each value it moves): a registered chat's
        // task then fits tokio's smallest task cell but one (BENCHMARKS.md, chats).
        tokio::spawn(task(StopSignal { shared: signal }).map(move |()| drop(registration)));
        Ok(())
    }

    /// Stops the task under `key` with `cause`; false if none runs.
    pub fn stop(&self, key: &K, cause: C) -> bool {
        match self.lock().get(key) {
            Some(entry) => {
                entry.signal.raise(cause);
                true
            }
            None => false,
        }
    }

    /// Stops every task of this set (not of the other sets) with `cause`.
    pub fn stop_all(&self, cause: C) {
        for entry in self.lock().values() {
            entry.signal.raise(cause.clone());
        }
    }

    /// What runs now, with its metadata (stopped tasks that have not ended yet included), in
    /// whatever collection the caller reads it best from.
    pub fn snapshot<B: FromIterator<(K, M)>>(&self) -> B {
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
        self.set.name
    }

    /// Notified (one stored permit) each time a task of this set has ended and its entry is
    /// gone, so [`TaskSet::len`] already counts it out: what a loop that fills free slots waits
    /// on ([`crate::runtime::Schedule::woken_locally_by`]).
    pub fn ended(&self) -> Arc<Notify> {
        self.set.ended.clone()
    }
}

/// Removes a task's entry when the task ends, however it ends (return, panic, runtime gone);
/// then its tracker token is dropped (fields drop after `drop`), so the drain never sees a task
/// done whose entry is still registered.
struct Registration<K: Eq + Hash, M, C> {
    set: Arc<SetInner<K, M, C>>,
    key: K,
    signal: Arc<Signal<C>>,
    _tracked: TaskTrackerToken,
}

impl<K: Eq + Hash, M, C> Drop for Registration<K, M, C> {
    fn drop(&mut self) {
        let mut entries = locked(&self.set.entries);
        if entries.get(&self.key).is_some_and(|e| Arc::ptr_eq(&e.signal, &self.signal)) {
            entries.remove(&self.key);
            drop(entries);
            self.set.ended.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    /// A lost wake-up or a drain that never ends fails the test instead of hanging it.
    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .unwrap_or_else(|_| panic!("{what}: timed out"))
    }

    #[tokio::test]
    async fn a_key_runs_once_and_is_free_again_when_its_task_ends() {
        let supervisor = Supervisor::default();
        let set: TaskSet<u32, i64, ()> = supervisor.task_set("test", ());
        let (release, released) = oneshot::channel::<()>();
        let (ended_tx, ended) = oneshot::channel::<()>();
        set.start(1, 7, |_| async move {
            let _ = released.await;
            let _ = ended_tx.send(());
        })
        .expect("starts");
        assert_eq!(set.start(1, 8, |_| async {}), Err(StartError::AlreadyRunning));
        assert_eq!(set.snapshot::<Vec<_>>(), vec![(1, 7)]);
        release.send(()).expect("task alive");
        within("the task", ended).await.expect("task ended");
        supervisor.cancel_all();
        within("the drain", supervisor.wait()).await;
        assert!(set.is_empty(), "the entry left with its task");
    }

    #[tokio::test]
    async fn ended_is_notified_once_the_entry_is_gone() {
        let supervisor = Supervisor::default();
        let set: TaskSet<u32, (), ()> = supervisor.task_set("test", ());
        let ended = set.ended();
        let (release, released) = oneshot::channel::<()>();
        set.start(1, (), |_| async move {
            let _ = released.await;
        })
        .expect("starts");
        set.start(2, (), |_| async {}).expect("starts");
        within("the first end", ended.notified()).await;
        release.send(()).expect("task alive");
        within("the second end", ended.notified()).await;
        assert!(set.is_empty(), "notified after the entry left, never before");
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Cause {
        Mine,
        Other,
        Shutdown,
    }

    #[tokio::test]
    async fn stop_reaches_one_task_with_the_first_cause_and_shutdown_reaches_all_and_is_awaited() {
        let supervisor = Supervisor::default();
        let set: TaskSet<u32, (), Cause> = supervisor.task_set("test", Cause::Shutdown);
        let (a_done_tx, a_done) = oneshot::channel();
        let (b_done_tx, b_done) = oneshot::channel();
        set.start(1, (), |mut signal| async move {
            signal.stopped().await;
            let _ = a_done_tx.send(signal.cause());
        })
        .expect("a");
        set.start(2, (), |mut signal| async move {
            signal.stopped().await;
            let _ = b_done_tx.send(signal.cause());
        })
        .expect("b");
        assert!(set.stop(&1, Cause::Mine));
        assert!(set.stop(&1, Cause::Other), "a stopping task is still registered");
        assert!(!set.stop(&3, Cause::Mine), "no task under 3");
        assert_eq!(within("a", a_done).await.expect("a ended"), Some(Cause::Mine), "the first cause wins");
        assert!(set.contains(&2), "b was not stopped");
        supervisor.cancel_all();
        assert_eq!(within("b", b_done).await.expect("b ended"), Some(Cause::Shutdown));
        within("the drain", supervisor.wait()).await;
        assert!(set.is_empty());
        assert_eq!(set.start(3, (), |_| async {}), Err(StartError::ShuttingDown));
    }

    #[tokio::test]
    async fn a_signal_raised_before_the_task_waits_is_not_missed() {
        let supervisor = Supervisor::default();
        let set: TaskSet<u32, (), Cause> = supervisor.task_set("test", Cause::Shutdown);
        let (go_tx, go) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        set.start(1, (), |mut signal| async move {
            let _ = go.await;
            assert!(signal.is_stopped());
            signal.stopped().await;
            let _ = done_tx.send(signal.cause());
        })
        .expect("starts");
        set.stop_all(Cause::Other);
        go_tx.send(()).expect("task alive");
        assert_eq!(within("the task", done).await.expect("ended"), Some(Cause::Other));
    }

    #[tokio::test]
    async fn a_task_that_panics_leaves_the_registry_and_the_drain() {
        let supervisor = Supervisor::default();
        let set: TaskSet<u32, (), ()> = supervisor.task_set("test", ());
        let (go_tx, go) = oneshot::channel::<()>();
        set.start(1, (), |_| async move {
            let _ = go.await;
            panic!("a task that panics");
        })
        .expect("starts");
        assert!(set.contains(&1));
        go_tx.send(()).expect("task alive");
        supervisor.cancel_all();
        within("the drain", supervisor.wait()).await;
        assert!(set.is_empty(), "the panicked task's entry is gone");
    }

    #[tokio::test]
    async fn shutdown_reaches_every_set() {
        let supervisor = Supervisor::default();
        let chats: TaskSet<u32, (), Cause> = supervisor.task_set("chats", Cause::Shutdown);
        let others: TaskSet<&'static str, (), ()> = supervisor.task_set("others", ());
        chats.start(1, (), |mut signal| async move { signal.stopped().await }).expect("chat");
        others.start("x", (), |mut signal| async move { signal.stopped().await }).expect("other");
        assert_eq!(supervisor.len(), 2);
        supervisor.cancel_all();
        within("the drain", supervisor.wait()).await;
        assert!(chats.is_empty() && others.is_empty() && supervisor.is_empty());
    }
}
