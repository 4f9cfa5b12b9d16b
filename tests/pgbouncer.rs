//! The statement policy holds behind pgbouncer in transaction mode: two pools ("replicas")
//! issuing the same statements concurrently see zero errors through `db::Exec`, while the
//! same workload with named prepared statements fails (so this test can fail).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::TestDb;
use common::pgbouncer::PgBouncer;
use tokio_postgres::types::Type;
use worker::db::{self, Db, Exec};

const TASKS_PER_POOL: usize = 8;
const ITERATIONS_PER_TASK: usize = 200;

#[derive(Default)]
struct Errors {
    count: AtomicU64,
    codes: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Errors {
    fn record(&self, code: Option<&str>) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.codes.lock().unwrap().insert(code.unwrap_or("none").to_owned());
    }
}

fn bounced_pool(bouncer: &PgBouncer, test_db: &TestDb) -> Db {
    let mut config = TestDb::database_config_for(&bouncer.url(&test_db.name), TASKS_PER_POOL);
    config.statement_timeout = std::time::Duration::from_secs(5);
    Db::new(&config).expect("pool through pgbouncer")
}

/// Runs `work` from TASKS_PER_POOL tasks on each of two pools, ITERATIONS_PER_TASK times each.
async fn hammer<F, Fut>(pools: [Db; 2], work: F) -> Arc<Errors>
where
    F: Fn(Db, i32) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), Option<String>>> + Send,
{
    let errors = Arc::new(Errors::default());
    let mut tasks = Vec::new();
    for pool in pools {
        for t in 0..TASKS_PER_POOL {
            let (pool, errors, work) = (pool.clone(), errors.clone(), work.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..ITERATIONS_PER_TASK {
                    if let Err(code) = work(pool.clone(), (t * ITERATIONS_PER_TASK + i) as i32).await {
                        errors.record(code.as_deref());
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("task");
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_statements_through_pgbouncer_never_fail_across_two_replicas() {
    let test_db = TestDb::new().await;
    let bouncer = PgBouncer::start(2).await;
    let pools = [bounced_pool(&bouncer, &test_db), bounced_pool(&bouncer, &test_db)];
    let errors = hammer(pools, |pool: Db, i: i32| async move {
        let run = async {
            let mut conn = pool.get().await?;
            // Autocommit statement, then a tick-style transaction with SET LOCAL + xact lock.
            let row = conn.fetch_one("SELECT $1::int4 + 1", &[(&i, Type::INT4)]).await?;
            assert_eq!(row.get::<_, i32>(0), i + 1);
            let tx = db::begin(
                &mut conn,
                db::TxLimits {
                    statement: std::time::Duration::from_secs(5),
                    idle: std::time::Duration::from_secs(5),
                },
            )
            .await?;
            db::try_xact_lock(&tx, 42).await?;
            tx.exec(
                "UPDATE loop_controls SET paused = paused WHERE loop_name = $1",
                &[(&"none", Type::TEXT)],
            )
            .await?;
            let text = format!("v{i}");
            let echoed = tx.fetch_one("SELECT $1::text", &[(&text, Type::TEXT)]).await?;
            assert_eq!(echoed.get::<_, String>(0), text);
            tx.commit().await?;
            Ok::<_, db::DbError>(())
        };
        run.await.map_err(|e: db::DbError| e.code().map(str::to_owned).or(Some(e.to_string())))
    })
    .await;
    let total = 2 * TASKS_PER_POOL * ITERATIONS_PER_TASK;
    assert_eq!(
        errors.count.load(Ordering::Relaxed),
        0,
        "{total} iterations through pgbouncer failed with {:?}",
        errors.codes.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statements_through_pgbouncer_do_fail() {
    let test_db = TestDb::new().await;
    let bouncer = PgBouncer::start(2).await;
    let pools = [bounced_pool(&bouncer, &test_db), bounced_pool(&bouncer, &test_db)];
    let errors = hammer(pools, |pool: Db, i: i32| async move {
        let conn = pool.get().await.map_err(|e| Some(e.to_string()))?;
        // The inherent `query` prepares a named statement (s0, s1, …): what the policy forbids.
        let result = conn.query("SELECT $1::int4 + 1", &[&i]).await;
        result.map(|_| ()).map_err(|e| e.code().map(|c| c.code().to_owned()).or(Some(e.to_string())))
    })
    .await;
    let codes = errors.codes.lock().unwrap().clone();
    assert!(errors.count.load(Ordering::Relaxed) > 0, "named statements unexpectedly survived pgbouncer");
    assert!(
        codes.contains("42P05") || codes.contains("26000"),
        "expected SQLSTATE 42P05/26000 from named statements, got {codes:?}"
    );
}
