//! The chat loops' instruments (`chats.*`). Labels are fixed strings (outcome kinds, causes),
//! never chat ids.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};

#[derive(Clone)]
pub struct ChatMetrics {
    acquisitions: Counter<u64>,
    turns: Counter<u64>,
    interrupts: Counter<u64>,
    recovered: Counter<u64>,
    released: Counter<u64>,
    heartbeat: Histogram<f64>,
    admission_wait: Histogram<f64>,
    capped: Counter<u64>,
    census: Arc<Census>,
}

/// The last pending census (`chats.pending`, `chats.pending.oldest_age`), read at each export.
#[derive(Default)]
struct Census {
    pending: AtomicU64,
    /// Seconds, as f64 bits.
    oldest_age: AtomicU64,
}

impl ChatMetrics {
    /// Registers the instruments, and the `chats.running` gauge that reads `running` (the number
    /// of runners) at each export.
    pub fn new(meter: &Meter, running: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        meter
            .u64_observable_gauge("chats.running")
            .with_description("Agent turns running in this worker")
            .with_callback(move |o| o.observe(running() as u64, &[]))
            .build();
        let census = Arc::new(Census::default());
        let observed = census.clone();
        meter
            .u64_observable_gauge("chats.pending")
            .with_description("Pending chats over every replica (the last census of this worker)")
            .with_callback(move |o| o.observe(observed.pending.load(Ordering::Relaxed), &[]))
            .build();
        let observed = census.clone();
        meter
            .f64_observable_gauge("chats.pending.oldest_age")
            .with_unit("s")
            .with_description("How long the longest-waiting pending chat has waited (the last census)")
            .with_callback(move |o| {
                o.observe(f64::from_bits(observed.oldest_age.load(Ordering::Relaxed)), &[])
            })
            .build();
        Self {
            census,
            admission_wait: meter
                .f64_histogram("chats.admission.wait")
                .with_unit("s")
                .with_description("Time from pending to running of the chats this worker claimed")
                .build(),
            capped: meter
                .u64_counter("chats.admission.capped")
                .with_description(
                    "Subjects passed over by a claim because they were at their cap with chats waiting, by cap (owner_cap, org_cap)",
                )
                .build(),
            acquisitions: meter
                .u64_counter("chats.acquisitions")
                .with_description("Chats claimed from pending by this worker")
                .build(),
            turns: meter
                .u64_counter("chats.turns")
                .with_description(
                    "Agent turns by how they ended (completed, an agent error kind, interrupted, …)",
                )
                .build(),
            interrupts: meter
                .u64_counter("chats.interrupts")
                .with_description(
                    "Runners stopped before their turn ended, by cause (stolen, lease, shutdown)",
                )
                .build(),
            recovered: meter
                .u64_counter("chats.recovered")
                .with_description("Running chats of dead workers returned to pending")
                .build(),
            released: meter
                .u64_counter("chats.released")
                .with_description(
                    "Chats owned here in the database but not running here, returned to pending",
                )
                .build(),
            heartbeat: meter
                .f64_histogram("chats.heartbeat.duration")
                .with_unit("s")
                .with_description("Wall time of one heartbeat: lease write, ownership read, set difference")
                .build(),
        }
    }

    pub fn acquired(&self, n: u64) {
        if n > 0 {
            self.acquisitions.add(n, &[]);
        }
    }

    pub fn turn(&self, outcome: &'static str) {
        self.turns.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub fn interrupt(&self, cause: &'static str) {
        self.interrupts.add(1, &[KeyValue::new("cause", cause)]);
    }

    pub fn recovered(&self, n: u64) {
        if n > 0 {
            self.recovered.add(n, &[]);
        }
    }

    pub fn released(&self, n: u64) {
        if n > 0 {
            self.released.add(n, &[]);
        }
    }

    /// A claimed chat had waited `seconds` since it became pending.
    pub fn admitted(&self, seconds: f64) {
        self.admission_wait.record(seconds.max(0.0), &[]);
    }

    pub fn capped(&self, cap: &'static str, subjects: u64) {
        if subjects > 0 {
            self.capped.add(subjects, &[KeyValue::new("cap", cap)]);
        }
    }

    pub fn set_pending(&self, pending: i64, oldest_age_seconds: f64) {
        self.census.pending.store(u64::try_from(pending).unwrap_or(0), Ordering::Relaxed);
        self.census.oldest_age.store(oldest_age_seconds.max(0.0).to_bits(), Ordering::Relaxed);
    }

    pub fn heartbeat(&self, seconds: f64) {
        self.heartbeat.record(seconds, &[]);
    }
}
