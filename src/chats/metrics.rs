//! The chat loops' instruments (`chats.*`). Labels are fixed strings (outcome kinds, causes),
//! never chat ids.

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
        Self {
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

    pub fn heartbeat(&self, seconds: f64) {
        self.heartbeat.record(seconds, &[]);
    }
}
