//! Which pending chats a claim takes: caps per owner and per org that hold across replicas, and a
//! fair share of free capacity among the owners who wait.
//!
//! # The model
//!
//! - **Waiting time orders.** `chats.pending_since` is set when a chat becomes pending (a trigger
//!   of migration V9, so every writer sets it) and cleared when it leaves.
//! - **Caps.** An owner runs at most `chats.max_running_per_owner` chats, an org (`chats.org_id`)
//!   at most `chats.max_running_per_org`, counted over every replica in the database; a
//!   `chat_quotas` row overrides either per subject (NULL = the default, 0 = no cap).
//! - **Fair order: the fewest running first (weighted water-filling).** Free slots go one at a
//!   time to the owner whose `(running + already picked in this claim) / weight` is lowest; ties,
//!   and the order within an owner, by the oldest `pending_since`. Each owner's k-th candidate gets
//!   the key `(running + k − 1) / weight`, so one `ORDER BY` over all candidates is the same as
//!   handing out the slots one by one.
//!
//! Why this and not deficit round robin: DRR keeps a deficit per owner across claims, state that
//! would have to live in a table every replica updates, and it shares *dispatches*, not *runner
//! time*. The running count is already in the database, needs no extra state, is exactly what a
//! cap counts, and an owner whose turns are long holds its slots longer, so it is served later:
//! the share it evens out is runner time. Weighted fair queuing by the same count is what
//! Hatchet's group round robin approximates.
//!
//! # Cost
//!
//! One statement, index-driven: the waiting owners by a skip scan over `chats_pending_owner_idx`
//! (one probe per owner), each owner's running count from `chats_running_owner_idx` (at most its
//! cap; without a cap, at most what runs on every replica), and each owner's oldest `min(limit, room)` pending chats (LIMIT inside a LATERAL).
//! Nothing reads more than `limit` rows of one owner, so an owner with 100k pending chats costs
//! what an owner with 5 does. The owners considered are bounded too: at most [`OWNER_SWEEP`]
//! consecutive waiting owners from a random point (all of them when that many or fewer wait),
//! plus the owners of the [`OLDEST_HEAD`] oldest pending chats, so 100k waiting owners cost what
//! 300 do; the price is that fairness among more than [`OWNER_SWEEP`] waiting owners is per
//! sample, not exact. `benches/admission.rs` shows the plan and its time.
//!
//! # Caps across replicas
//!
//! Two replicas that both count an owner at 4 of 5 would both take one. So claims take one
//! transaction-scoped advisory lock ([`CLAIM_LOCK_KEY`]) before the claim statement, and the
//! statement's snapshot, taken after the lock is granted, sees every earlier claim committed.
//! Claims are serialised across replicas, which costs little: a claim is one short statement
//! (p99 in BENCHMARKS.md), and an idle claim finds nothing in well under a millisecond. The
//! alternative, per-subject counter rows locked `FOR UPDATE SKIP LOCKED`, keeps claims parallel
//! but makes every status change of every chat write a hot row of its owner and org.

use tokio_postgres::types::Type;
use uuid::Uuid;

use super::config::ChatsConfig;
pub use super::config::Order;
use super::runner::Claimed;
use crate::db::{DbError, Exec};

/// Advisory lock serialising claims across replicas ("chatclaim" would not fit: "chatclam"
/// in ASCII). In `pg_locks`: `locktype = 'advisory'`, `classid = 1667785076`, `objid =
/// 1668047213`.
pub const CLAIM_LOCK_KEY: i64 = 0x6368_6174_636c_616d;

/// Waiting owners one claim considers by the sweep: consecutive in `owner_id` order from a random
/// point, wrapping around. With this many waiting owners or fewer, every one is considered.
pub const OWNER_SWEEP: i32 = 256;
/// The owners of the oldest this-many pending chats (at least the claim's limit) are always
/// considered too, so with more waiting owners than the sweep takes, the oldest waits are never
/// passed over for long: no chat starves.
pub const OLDEST_HEAD: i64 = 64;

/// Serialises this transaction's claim against every other replica's, until commit.
pub const LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

/// The claim. `$1` worker id, `$2` chats to claim at most, `$3` default owner cap, `$4` default
/// org cap (0 = none), `$5` true for the fair order, false for FIFO by `pending_since` (caps
/// hold either way), `$6` where the owner sweep starts (a random uuid), `$7`
/// [`OWNER_SWEEP`], `$8` [`OLDEST_HEAD`].
///
/// Times are the statement's (`statement_timestamp()`), taken after the claim lock was granted,
/// not the transaction's start: `started_at` and the wait count the time spent queuing for the
/// lock. Returns one row per claimed chat (`kind = 'claimed'`: id, generation, owner, workspace,
/// title, seconds waited) and one row per cap that held chats back (`kind = 'owner_cap'` or
/// `'org_cap'`, the number of subjects at their cap with chats waiting, in `waited`).
pub const CLAIM: &str = "WITH RECURSIVE sweep(owner_id, n, wrapped) AS (\
       SELECT (SELECT owner_id FROM chats \
               WHERE status = 'pending' AND NOT archived AND owner_id >= $6 \
               ORDER BY owner_id LIMIT 1), 1, false \
       UNION ALL \
       SELECT CASE WHEN s.owner_id IS NULL \
                THEN (SELECT c.owner_id FROM chats AS c WHERE c.status = 'pending' AND NOT c.archived \
                      ORDER BY c.owner_id LIMIT 1) \
                ELSE (SELECT c.owner_id FROM chats AS c \
                      WHERE c.status = 'pending' AND NOT c.archived AND c.owner_id > s.owner_id \
                      ORDER BY c.owner_id LIMIT 1) END, \
              s.n + 1, s.wrapped OR s.owner_id IS NULL \
       FROM sweep AS s \
       WHERE s.n < $7 AND NOT (s.wrapped AND (s.owner_id IS NULL OR s.owner_id >= $6))), \
     owners AS (\
       SELECT owner_id FROM sweep \
       WHERE owner_id IS NOT NULL AND NOT (wrapped AND owner_id >= $6) \
       UNION \
       SELECT owner_id FROM (SELECT owner_id FROM chats WHERE status = 'pending' AND NOT archived \
                             ORDER BY pending_since, id LIMIT greatest($2, $8)) AS head), \
     budget AS (\
       SELECT o.owner_id, coalesce(q.weight, 1) AS weight, r.running, \
              CASE WHEN coalesce(q.max_running, $3) = 0 THEN $2 \
                   ELSE least($2, coalesce(q.max_running, $3) - r.running) END AS room \
       FROM owners AS o \
       LEFT JOIN chat_quotas AS q ON q.subject_kind = 'owner' AND q.subject_id = o.owner_id \
       CROSS JOIN LATERAL (SELECT count(*) AS running FROM chats AS c \
                           WHERE c.status = 'running' AND c.owner_id = o.owner_id) AS r), \
     candidates AS (\
       SELECT p.id, p.org_id, p.pending_since, (b.running + p.k - 1) / b.weight AS share \
       FROM budget AS b CROSS JOIN LATERAL (\
         SELECT c.id, c.org_id, c.pending_since, row_number() OVER (ORDER BY c.pending_since, c.id) AS k \
         FROM chats AS c \
         WHERE c.status = 'pending' AND NOT c.archived AND c.owner_id = b.owner_id \
         ORDER BY c.pending_since, c.id LIMIT greatest(b.room, 0)) AS p), \
     orgs AS (\
       SELECT g.org_id, coalesce(q.weight, 1) AS weight, \
              CASE WHEN coalesce(q.max_running, $4) = 0 THEN NULL \
                   ELSE coalesce(q.max_running, $4) - (SELECT count(*) FROM chats AS c \
                        WHERE c.status = 'running' AND c.org_id IS NOT NULL AND c.org_id = g.org_id) \
              END AS room \
       FROM (SELECT DISTINCT org_id FROM candidates WHERE org_id IS NOT NULL) AS g \
       LEFT JOIN chat_quotas AS q ON q.subject_kind = 'org' AND q.subject_id = g.org_id), \
     ranked AS (\
       SELECT c.id, c.pending_since, c.share / coalesce(g.weight, 1) AS share, g.room AS org_room, \
              row_number() OVER (PARTITION BY c.org_id \
                                 ORDER BY c.share / coalesce(g.weight, 1), c.pending_since, c.id) AS org_k \
       FROM candidates AS c LEFT JOIN orgs AS g ON g.org_id = c.org_id), \
     picked AS (\
       SELECT id, pending_since FROM ranked WHERE org_room IS NULL OR org_k <= org_room \
       ORDER BY CASE WHEN $5 THEN share END, pending_since, id LIMIT $2), \
     locked AS (\
       SELECT c.id, p.pending_since FROM chats AS c JOIN picked AS p ON p.id = c.id \
       WHERE c.status = 'pending' AND NOT c.archived FOR UPDATE OF c SKIP LOCKED), \
     claimed AS (\
       UPDATE chats AS c SET status = 'running', worker_id = $1, generation = c.generation + 1, \
         started_at = statement_timestamp(), updated_at = statement_timestamp(), last_error = NULL \
       FROM locked AS l WHERE c.id = l.id \
       RETURNING c.id, c.generation, c.owner_id, c.workspace_id, c.title, \
         extract(epoch FROM statement_timestamp() - l.pending_since)::float8 AS waited) \
     SELECT 'claimed' AS kind, id, generation, owner_id, workspace_id, title, waited FROM claimed \
     UNION ALL \
     SELECT 'owner_cap', NULL, NULL, NULL, NULL, NULL, count(*)::float8 FROM budget WHERE room <= 0 \
       HAVING count(*) > 0 \
     UNION ALL \
     SELECT 'org_cap', NULL, NULL, NULL, NULL, NULL, count(*)::float8 FROM orgs WHERE room <= 0 \
       HAVING count(*) > 0";

/// What the claim enforces, from this worker's `[chats]` config (quotas come from the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Default cap per owner; 0 = none.
    pub owner_cap: u32,
    /// Default cap per org; 0 = none.
    pub org_cap: u32,
    pub order: Order,
}

impl Rules {
    pub fn of(config: &ChatsConfig) -> Self {
        Self {
            owner_cap: config.max_running_per_owner,
            org_cap: config.max_running_per_org,
            order: config.admission,
        }
    }
}

/// What one claim did.
#[derive(Debug, Default)]
pub struct Admitted {
    /// The claimed chats, each with the seconds it had waited since it became pending.
    pub chats: Vec<(Claimed, f64)>,
    /// Owners at their cap with chats waiting, passed over.
    pub owners_capped: u64,
    /// Orgs at their cap with chats waiting, passed over.
    pub orgs_capped: u64,
}

/// Claims up to `limit` chats for `worker` in `tx` (READ COMMITTED, as `db::begin` opens it):
/// takes the claim lock, then runs [`CLAIM`]. The caller commits; the lock is held until then.
pub async fn claim(
    tx: &(impl Exec + ?Sized),
    worker: Uuid,
    limit: u32,
    rules: Rules,
) -> Result<Admitted, DbError> {
    tx.exec(LOCK, &[(&CLAIM_LOCK_KEY, Type::INT8)]).await?;
    let limit = i64::from(limit);
    // Validated to fit (`chats.max_running_per_*` ≤ 1,000,000).
    let owner_cap = i32::try_from(rules.owner_cap).unwrap_or(i32::MAX);
    let org_cap = i32::try_from(rules.org_cap).unwrap_or(i32::MAX);
    let fair = rules.order == Order::Fair;
    let sweep_from = Uuid::new_v4();
    let rows = tx
        .fetch_all(
            CLAIM,
            &[
                (&worker, Type::UUID),
                (&limit, Type::INT8),
                (&owner_cap, Type::INT4),
                (&org_cap, Type::INT4),
                (&fair, Type::BOOL),
                (&sweep_from, Type::UUID),
                (&OWNER_SWEEP, Type::INT4),
                (&OLDEST_HEAD, Type::INT8),
            ],
        )
        .await?;
    let mut admitted = Admitted::default();
    for row in &rows {
        let value: f64 = row.get(6);
        match row.get::<_, &str>(0) {
            "claimed" => admitted.chats.push((
                Claimed {
                    id: row.get(1),
                    generation: row.get(2),
                    owner_id: row.get(3),
                    workspace_id: row.get(4),
                    title: row.get(5),
                },
                value,
            )),
            "owner_cap" => admitted.owners_capped = value as u64,
            _ => admitted.orgs_capped = value as u64,
        }
    }
    Ok(admitted)
}
