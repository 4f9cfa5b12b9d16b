//! Pure decisions of a sweep: what happens to a row given what Redis said about it, and how long
//! a failed row waits before its next attempt. No I/O, no clock, no randomness of their own.

use std::time::Duration;

use super::scheduler::RowOutcome;

/// Spread of the retry delay: ±20% so rows that failed together do not retry together.
pub const RETRY_JITTER: f64 = 0.2;

/// What to do with one claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// In Redis: delete the row.
    Dispatched,
    /// Failed: `attempts + 1`, this error, due again after a backoff.
    Retry { error: String },
    /// Failed for the last time (`attempts + 1 >= max_attempts`): move to `task_outbox_dead`.
    DeadLetter { error: String },
    /// Outcome unknown: leave the row exactly as it was (no attempt consumed).
    Untouched { error: String },
}

/// Decides one row from its attempts so far and its Redis outcome.
pub fn settle(attempts: i32, outcome: RowOutcome, max_attempts: u32) -> Settlement {
    match outcome {
        RowOutcome::Written => Settlement::Dispatched,
        RowOutcome::Unknown(error) => Settlement::Untouched { error },
        RowOutcome::Rejected(error) => {
            let after = i64::from(attempts.max(0)) + 1;
            if after >= i64::from(max_attempts) {
                Settlement::DeadLetter { error }
            } else {
                Settlement::Retry { error }
            }
        }
    }
}

/// The wait before the next attempt of a row that has failed `attempts` times before this
/// failure: `min(base · 2^attempts, max)`, then ±[`RETRY_JITTER`], never above `max`. `unit` is a
/// random number in [0, 1).
pub fn retry_delay(attempts: i32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exponent = attempts.clamp(0, 30) as u32;
    let capped = base.saturating_mul(2u32.saturating_pow(exponent)).min(max);
    let factor = 1.0 - RETRY_JITTER + 2.0 * RETRY_JITTER * unit.clamp(0.0, 1.0);
    capped.mul_f64(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn rows_are_settled_by_their_own_outcome() {
        let rejected = || RowOutcome::Rejected("WRONGTYPE".into());
        let cases = [
            (0, RowOutcome::Written, 10, Settlement::Dispatched),
            (9, RowOutcome::Written, 10, Settlement::Dispatched),
            (0, rejected(), 10, Settlement::Retry { error: "WRONGTYPE".into() }),
            (8, rejected(), 10, Settlement::Retry { error: "WRONGTYPE".into() }),
            (9, rejected(), 10, Settlement::DeadLetter { error: "WRONGTYPE".into() }),
            (12, rejected(), 10, Settlement::DeadLetter { error: "WRONGTYPE".into() }),
            (0, rejected(), 1, Settlement::DeadLetter { error: "WRONGTYPE".into() }),
            (9, RowOutcome::Unknown("timeout".into()), 10, Settlement::Untouched { error: "timeout".into() }),
        ];
        for (attempts, outcome, max, expected) in cases {
            assert_eq!(settle(attempts, outcome.clone(), max), expected, "{attempts} {outcome:?} max {max}");
        }
    }

    #[test]
    fn retry_delay_doubles_per_attempt_up_to_the_cap() {
        let (base, max) = (S(1), S(300));
        let cases = [(0, S(1)), (1, S(2)), (3, S(8)), (8, S(256)), (9, S(300)), (30, S(300)), (1000, S(300))];
        for (attempts, expected) in cases {
            assert_eq!(retry_delay(attempts, base, max, 0.5), expected, "attempts {attempts}");
        }
    }

    #[test]
    fn retry_delay_is_jittered_but_never_above_the_cap() {
        let (base, max) = (S(1), S(300));
        assert_eq!(retry_delay(2, base, max, 0.0), Duration::from_millis(3200));
        assert!(retry_delay(2, base, max, 0.999_999) > Duration::from_millis(4790));
        assert!(retry_delay(2, base, max, 0.999_999) <= Duration::from_millis(4800));
        assert_eq!(retry_delay(20, base, max, 0.999_999), max);
        assert_eq!(retry_delay(20, base, max, 0.0), S(240));
        assert_eq!(retry_delay(-3, base, max, 0.5), S(1), "a negative count is treated as zero");
        assert_eq!(retry_delay(2, base, max, 7.0), retry_delay(2, base, max, 1.0), "unit is clamped");
    }
}
