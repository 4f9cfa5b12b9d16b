//! This worker's lease, as the lease loop last saw it, published to every loop that must stop
//! acquiring work (or stop the work it runs) when the lease fails or was lost.
//!
//! The lease is the `workers` row: other replicas recover this worker's chats once its
//! `last_seen_at` is older than `stale_after`. So a worker whose renewals fail must assume, after
//! a while, that its work may already run elsewhere; and a worker whose row was deleted (reaped
//! as dead) has lost everything it owned. The `epoch` counts registrations: work started under
//! one epoch must stop when the epoch changes, even if the status has meanwhile gone back to
//! healthy (a watch channel keeps only the latest value, so a brief `Lost` could be missed).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What the last renewal attempts said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// The last renewal succeeded.
    Healthy,
    /// The last renewal failed (or never finished). How long work may go on is counted from
    /// [`LeaseState::renewed_at`], not from the failure.
    Failing,
    /// The row was gone (reaped as dead) and could not be registered again yet.
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    pub status: LeaseStatus,
    /// Incremented each time the row had to be registered again after it was lost.
    pub epoch: u64,
    /// When the last successful renewal (or registration) *started*: its `now()` in the database
    /// is no earlier, so no other worker can judge this lease stale before `renewed_at +
    /// stale_after`. `None` until the first renewal published here.
    pub renewed_at: Option<Instant>,
}

impl LeaseState {
    /// Whether work may start: a renewal has succeeded and the last attempt did not fail.
    pub fn is_healthy(&self) -> bool {
        self.status == LeaseStatus::Healthy && self.renewed_at.is_some()
    }

    /// Whether work whose deadline is `budget` after the last renewal may start at `now`:
    /// healthy, and that deadline still ahead. A process that was frozen (SIGSTOP, a stalled VM)
    /// made no failed attempt, so it still reads healthy when it thaws, with a renewal long past:
    /// other workers may already judge it stale and recover what it owned.
    pub fn may_start_work(&self, now: Instant, budget: Duration) -> bool {
        self.is_healthy() && self.renewed_at.is_some_and(|renewed_at| now < renewed_at + budget)
    }
}

/// Read side: any number of loops.
#[derive(Debug, Clone)]
pub struct LeaseWatch(watch::Receiver<LeaseState>);

impl LeaseWatch {
    pub fn current(&self) -> LeaseState {
        *self.0.borrow()
    }

    /// Waits for the next change (returns at once if one is unseen). If the publisher is gone
    /// nothing will change any more: this then never returns.
    pub async fn changed(&mut self) -> LeaseState {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.0.borrow_and_update()
    }
}

/// Write side: the lease loop only.
#[derive(Debug, Clone)]
pub struct LeasePublisher(Arc<watch::Sender<LeaseState>>);

impl Default for LeasePublisher {
    fn default() -> Self {
        Self(Arc::new(
            watch::channel(LeaseState { status: LeaseStatus::Healthy, epoch: 0, renewed_at: None }).0,
        ))
    }
}

impl LeasePublisher {
    pub fn watch(&self) -> LeaseWatch {
        LeaseWatch(self.0.subscribe())
    }

    pub fn current(&self) -> LeaseState {
        *self.0.borrow()
    }

    /// A renewal (or registration) that started at `started` succeeded. Every renewal is
    /// published (watchers extend their deadlines from it), never moving `renewed_at` back.
    pub fn renewed(&self, started: Instant) {
        self.0.send_modify(|state| {
            state.status = LeaseStatus::Healthy;
            state.renewed_at = Some(state.renewed_at.map_or(started, |before| before.max(started)));
        });
    }

    /// A renewal failed (or never finished).
    pub fn failed(&self) {
        self.0.send_if_modified(|state| match state.status {
            LeaseStatus::Healthy => {
                state.status = LeaseStatus::Failing;
                true
            }
            LeaseStatus::Failing | LeaseStatus::Lost => false,
        });
    }

    /// The row was gone: everything owned under the current epoch is lost.
    pub fn lost(&self) {
        self.0.send_modify(|state| {
            state.status = LeaseStatus::Lost;
            state.epoch += 1;
        });
    }

    /// A guard for one renewal attempt: dropped without [`LeaseAttempt::succeeded`] (an error,
    /// or the tick cut off by its timeout) it records a failure.
    /// Call it before the renewal's first statement is sent: its instant is the renewal's start.
    pub fn attempt(&self) -> LeaseAttempt<'_> {
        LeaseAttempt { publisher: self, started: Instant::now(), done: false }
    }
}

pub struct LeaseAttempt<'a> {
    publisher: &'a LeasePublisher,
    started: Instant,
    done: bool,
}

impl LeaseAttempt<'_> {
    pub fn succeeded(mut self) {
        self.done = true;
        self.publisher.renewed(self.started);
    }
}

impl Drop for LeaseAttempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.publisher.failed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_may_start_only_while_healthy_and_inside_the_budget_of_the_last_renewal() {
        let renewed = Instant::now();
        let budget = Duration::from_secs(10);
        let state = |status, renewed_at| LeaseState { status, epoch: 0, renewed_at };
        let healthy = state(LeaseStatus::Healthy, Some(renewed));
        assert!(healthy.may_start_work(renewed, budget));
        assert!(healthy.may_start_work(renewed + Duration::from_millis(9_999), budget));
        // Thawed after a freeze: no failed attempt, still "healthy", but the renewal is too old.
        assert!(healthy.is_healthy());
        assert!(!healthy.may_start_work(renewed + budget, budget));
        assert!(!healthy.may_start_work(renewed + Duration::from_secs(60), budget));
        assert!(!state(LeaseStatus::Failing, Some(renewed)).may_start_work(renewed, budget));
        assert!(!state(LeaseStatus::Lost, Some(renewed)).may_start_work(renewed, budget));
        assert!(!state(LeaseStatus::Healthy, None).may_start_work(renewed, budget), "never renewed");
    }

    #[test]
    fn a_failure_keeps_the_last_renewal_and_a_success_heals() {
        let publisher = LeasePublisher::default();
        let watch = publisher.watch();
        assert!(!watch.current().is_healthy(), "never renewed");
        let first = publisher.attempt();
        let first_started = first.started;
        first.succeeded();
        drop(publisher.attempt());
        assert_eq!(
            watch.current(),
            LeaseState { status: LeaseStatus::Failing, epoch: 0, renewed_at: Some(first_started) },
            "a failure moves no deadline"
        );
        assert!(!watch.current().is_healthy());
        let attempt = publisher.attempt();
        let started = attempt.started;
        attempt.succeeded();
        assert_eq!(
            watch.current(),
            LeaseState { status: LeaseStatus::Healthy, epoch: 0, renewed_at: Some(started) },
            "the renewal counts from its start"
        );
        assert!(watch.current().is_healthy());
    }

    #[test]
    fn a_lost_lease_bumps_the_epoch_so_a_quick_recovery_is_still_seen() {
        let publisher = LeasePublisher::default();
        let watch = publisher.watch();
        publisher.lost();
        assert_eq!(watch.current().status, LeaseStatus::Lost);
        let now = Instant::now();
        publisher.renewed(now);
        assert_eq!(
            watch.current(),
            LeaseState { status: LeaseStatus::Healthy, epoch: 1, renewed_at: Some(now) }
        );
        publisher.renewed(now - Duration::from_secs(1));
        assert_eq!(
            watch.current().renewed_at,
            Some(now),
            "a late answer to an older renewal moves nothing back"
        );
    }
}
