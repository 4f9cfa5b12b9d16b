//! Fixtures of the outbox and counters tests: a database of their own, a Redis key prefix of
//! their own, clients, and helpers to enqueue and to read state back.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

pub mod redis_server;

use std::collections::{BTreeMap, HashMap};

use fred::prelude::{ClientLike, HashesInterface, SortedSetsInterface};
use opentelemetry::metrics::Meter;
use tokio_postgres::types::Type;
use worker::config::Config;
use worker::db::{Db, Exec};
use worker::outbox::Sweeper;
use worker::redis::Client;
use worker::redis::RedisConfig;

use crate::common::TestDb;

pub struct Harness {
    pub test_db: TestDb,
    pub config: Config,
    /// Connected to the shared test Redis; the sweeper's client.
    pub redis: Client,
}

/// A client for `config`, connected (waits for the first connection).
pub async fn connected(config: &RedisConfig) -> Client {
    let client = worker::redis::build(config).expect("redis client");
    client.init().await.expect("connect to redis");
    client
}

impl Harness {
    pub async fn new() -> Self {
        let test_db = TestDb::new().await;
        let config = test_db.config();
        let redis = connected(&config.redis).await;
        Self { test_db, config, redis }
    }

    pub fn db(&self) -> &Db {
        &self.test_db.db
    }

    pub fn prefix(&self) -> &str {
        &self.config.redis.prefix
    }

    pub fn sweeper(&self, meter: &Meter) -> Sweeper {
        Sweeper::new(self.db().clone(), self.redis.clone(), self.prefix(), self.config.outbox.clone(), meter)
    }

    /// Runs one statement, returning the number of rows it affected.
    pub async fn exec(&self, sql: &str) -> u64 {
        self.db().get().await.expect("conn").exec(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The first column of a one-row query, as i64.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let row = self
            .db()
            .get()
            .await
            .expect("conn")
            .fetch_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.get(0)
    }

    /// `n` tasks `t1..tn` through `enqueue_task`, round-robin over `queues`, due now (spread over
    /// the last few seconds so scores differ), in one statement.
    pub async fn enqueue(&self, n: i64, queues: &[&str], job_id: Option<&str>) {
        let queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
        self.db()
            .get()
            .await
            .expect("conn")
            .fetch_one(
                "SELECT count(enqueue_task('t' || g, ($2::text[])[1 + g % array_length($2, 1)], \
                 jsonb_build_object('n', g, 'kind', 'test'), now() - make_interval(secs => g / 1000.0), $3)) \
                 FROM generate_series(1, $1) AS g",
                &[(&n, Type::INT8), (&queues, Type::TEXT_ARRAY), (&job_id, Type::TEXT)],
            )
            .await
            .expect("enqueue");
    }

    /// What should land in Redis: queue → task id → (score, payload JSON).
    pub async fn expected(&self) -> BTreeMap<String, BTreeMap<String, (f64, serde_json::Value)>> {
        let rows = self
            .db()
            .get()
            .await
            .expect("conn")
            .fetch_all(
                "SELECT queue, task_id, floor(extract(epoch FROM run_at) * 1000)::int8, payload FROM task_outbox",
                &[],
            )
            .await
            .expect("outbox rows");
        let mut expected: BTreeMap<String, BTreeMap<String, (f64, serde_json::Value)>> = BTreeMap::new();
        for r in rows {
            let score = r.get::<_, i64>(2) as f64;
            expected.entry(r.get(0)).or_default().insert(r.get(1), (score, r.get(3)));
        }
        expected
    }

    /// What is in Redis for `queue`: task id → (score, payload JSON).
    pub async fn scheduled(&self, queue: &str) -> BTreeMap<String, (f64, serde_json::Value)> {
        let sched: Vec<(String, f64)> = self
            .redis
            .zrange(worker::redis::key(self.prefix(), "sched", queue), 0, -1, None, false, None, true)
            .await
            .expect("zrange");
        let payloads: HashMap<String, String> =
            self.redis.hgetall(worker::redis::key(self.prefix(), "payload", queue)).await.expect("hgetall");
        sched
            .into_iter()
            .map(|(task, score)| {
                let payload = payloads.get(&task).map(|p| serde_json::from_str(p).expect("payload is JSON"));
                (task, (score, payload.unwrap_or(serde_json::Value::Null)))
            })
            .collect()
    }
}
