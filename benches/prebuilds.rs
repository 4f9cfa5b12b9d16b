//! Prebuilds benchmark (targets in BENCHMARKS.md#targets): 10,000 presets of which 100 need work →
//! one reconciliation cycle's time and the peak number of reconciler connections busy (sampled from
//! `pg_stat_activity`), against a baseline measured in the same run that reconciles every preset
//! (no skip) with unbounded concurrency, each in a transaction of its own, on a pool of 50.
//!
//! The data: 100 templates × 100 versions, one preset per version (desired 1, TTL 1 day); each
//! template's newest version is active, so 100 presets need one prebuild each and 9,900 belong to
//! old versions with nothing left (idle). Plus history the snapshot must not pay for: 20,000
//! claimed workspaces (other owners) and 10,000 deleted prebuilds, each with a build and a job.
//! Every sample starts from that state (the previous sample's prebuilds removed, then ANALYZE).
//!
//! `cargo bench --bench prebuilds -- [--samples N] [--pool N] [--baseline-pool N]`;
//! `scripts/bench.sh prebuilds` runs it and prints the machine it ran on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::{BenchDb, ms, quantile, table};
use futures_util::future::join_all;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::config::{Concurrency, Config};
use worker::db::DatabaseConfig;
use worker::db::{self, Db, Exec};
use worker::health::Health;
use worker::prebuilds::actions::calculate_actions;
use worker::prebuilds::reconciler::{self, PresetPlan};
use worker::prebuilds::{LEADER_KEY, PrebuildsConfig, Reconciler, snapshot};
use worker::runtime::RuntimeConfig;
use worker::runtime::{Outcome, Runtime};

const TEMPLATES: i64 = 100;
const VERSIONS_PER_TEMPLATE: i64 = 100;
const CLAIMED: i64 = 20_000;
const DELETED: i64 = 10_000;

struct Args {
    samples: usize,
    pool: usize,
    baseline_pool: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Args { samples: 5, pool: 10, baseline_pool: 50 };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--samples" => args.samples = value()?.parse()?,
                "--pool" => args.pool = value()?.parse()?,
                "--baseline-pool" => args.baseline_pool = value()?.parse()?,
                _ => {} // cargo bench passes --bench
            }
        }
        Ok(args)
    }
}

async fn seed(bench: &BenchDb, system_user: Uuid) -> anyhow::Result<()> {
    let direct = bench.direct().await?;
    direct
        .exec(
            "INSERT INTO templates (name) SELECT 't' || g FROM generate_series(1, $1) AS g",
            &[(&TEMPLATES, Type::INT8)],
        )
        .await?;
    direct
        .exec(
            "INSERT INTO template_versions (template_id, name) \
             SELECT t.id, 'v' || v FROM templates AS t, generate_series(1, $1) AS v",
            &[(&VERSIONS_PER_TEMPLATE, Type::INT8)],
        )
        .await?;
    direct
        .exec(
            "UPDATE templates AS t SET active_version_id = v.id FROM template_versions AS v \
             WHERE v.template_id = t.id AND v.name = 'v' || $1::int8",
            &[(&VERSIONS_PER_TEMPLATE, Type::INT8)],
        )
        .await?;
    direct
        .exec(
            "INSERT INTO presets (template_version_id, name, desired_instances, invalidate_after_secs) \
             SELECT id, 'p-' || name, 1, 86400 FROM template_versions",
            &[],
        )
        .await?;
    // History: claimed workspaces (other owners) and deleted prebuilds, spread over the presets.
    let system = system_user.to_string();
    direct
        .batch_execute(&format!(
            "CREATE TEMP TABLE history AS \
             SELECT gen_random_uuid() AS ws, gen_random_uuid() AS job, p.id AS preset, \
                    p.template_version_id AS version, v.template_id AS template, \
                    CASE WHEN g <= {DELETED} THEN '{system}'::uuid ELSE gen_random_uuid() END AS owner, \
                    g <= {DELETED} AS deleted \
             FROM generate_series(1, {total}) AS g \
             JOIN (SELECT id, template_version_id, row_number() OVER (ORDER BY id) AS n FROM presets) AS p \
               ON p.n = 1 + g % {presets} \
             JOIN template_versions AS v ON v.id = p.template_version_id; \
             INSERT INTO workspaces (id, owner_id, template_id, preset_id, name, deleted, created_at) \
               SELECT ws, owner, template, preset, 'w', deleted, now() - interval '2 days' FROM history; \
             INSERT INTO provisioner_jobs (id, status, completed_at) \
               SELECT job, 'succeeded', now() - interval '2 days' FROM history; \
             INSERT INTO workspace_builds \
               (workspace_id, template_version_id, preset_id, transition, build_number, job_id, initiator_id) \
               SELECT ws, version, preset, 'start', 1, job, owner FROM history; \
             DROP TABLE history",
            total = CLAIMED + DELETED,
            presets = TEMPLATES * VERSIONS_PER_TEMPLATE,
        ))
        .await?;
    // On its own: a multi-statement batch is one implicit transaction, and VACUUM refuses those.
    direct.batch_execute("VACUUM ANALYZE").await?;
    Ok(())
}

/// Removes the prebuilds a sample created, so the next one starts from the seeded state.
async fn reset(bench: &BenchDb) -> anyhow::Result<()> {
    let direct = bench.direct().await?;
    direct
        .batch_execute(
            "CREATE TEMP TABLE made AS \
               SELECT b.workspace_id, b.job_id FROM workspace_builds AS b \
               JOIN workspaces AS w ON w.id = b.workspace_id WHERE w.name LIKE 'prebuild-%'; \
             DELETE FROM workspace_builds WHERE job_id IN (SELECT job_id FROM made); \
             DELETE FROM provisioner_jobs WHERE id IN (SELECT job_id FROM made); \
             DELETE FROM workspaces WHERE id IN (SELECT workspace_id FROM made); \
             DROP TABLE made; \
             ANALYZE",
        )
        .await?;
    Ok(())
}

/// Samples the busy `application_name = 'worker'` backends of the benchmark database until
/// stopped; returns the peak and the number of samples.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicI64>,
    handle: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

const BUSY: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND application_name = 'worker' AND state <> 'idle'";

impl Sampler {
    async fn start(bench: &BenchDb) -> anyhow::Result<Self> {
        let client = worker::db::connect_direct(&bench.url, "worker-bench-sampler").await?;
        let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicI64::new(0)));
        let handle = {
            let (stop, peak) = (stop.clone(), peak.clone());
            tokio::spawn(async move {
                let mut samples = 0;
                while !stop.load(Ordering::Relaxed) {
                    let busy: i64 = client.fetch_one(BUSY, &[]).await?.get(0);
                    peak.fetch_max(busy, Ordering::Relaxed);
                    samples += 1;
                }
                Ok(samples)
            })
        };
        Ok(Self { stop, peak, handle })
    }

    async fn finish(self) -> anyhow::Result<(i64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.handle.await??;
        Ok((self.peak.load(Ordering::Relaxed), samples))
    }
}

#[derive(Default)]
struct Variant {
    cycles: Vec<Duration>,
    snapshots: Vec<Duration>,
    created: u64,
    slots: usize,
    peak: i64,
    samples: u64,
}

impl Variant {
    fn row(&mut self, name: &str, pool: usize, concurrency: &str) -> Vec<String> {
        self.cycles.sort();
        self.snapshots.sort();
        vec![
            name.to_owned(),
            pool.to_string(),
            concurrency.to_owned(),
            ms(quantile(&self.cycles, 0.5)),
            ms(quantile(&self.cycles, 1.0)),
            ms(quantile(&self.snapshots, 0.5)),
            self.created.to_string(),
            self.slots.to_string(),
            format!("{} ({} samples)", self.peak, self.samples),
        ]
    }
}

/// The reconciler through the runtime's runner (leader lock, snapshot, plan, bounded executor).
async fn reconciler_cycle(
    bench: &BenchDb,
    rt: &Runtime,
    reconciler: Reconciler,
    variant: &mut Variant,
) -> anyhow::Result<()> {
    let last = reconciler.last_cycle();
    let mut runner = rt.runner(reconciler);
    let sampler = Sampler::start(bench).await?;
    let started = Instant::now();
    let report = runner.tick_once().await;
    let elapsed = started.elapsed();
    let (peak, samples) = sampler.finish().await?;
    anyhow::ensure!(report.outcome == Outcome::Ok, "tick: {:?}", report.outcome);
    let stats = last.get().context("no cycle stats")?;
    anyhow::ensure!(stats.failed == 0, "failed presets: {stats:?}");
    variant.cycles.push(elapsed);
    variant.snapshots.push(stats.snapshot);
    variant.created = stats.created;
    variant.slots = stats.slots_taken;
    variant.peak = variant.peak.max(peak);
    variant.samples += samples;
    Ok(())
}

/// The baseline: the same lock, snapshot and statements, but every preset (no skip) reconciled
/// at once (unbounded), each in its own transaction on its own pooled connection.
async fn baseline_cycle(
    bench: &BenchDb,
    db: &Db,
    config: &PrebuildsConfig,
    variant: &mut Variant,
) -> anyhow::Result<()> {
    let sampler = Sampler::start(bench).await?;
    let started = Instant::now();
    let mut leader = db.get().await?;
    let lock = db::begin(&mut leader, db.tx_limits()).await?;
    anyhow::ensure!(db::try_xact_lock(&lock, LEADER_KEY).await?, "leader lock");
    let snapshot_started = Instant::now();
    let snap = db::begin_snapshot(db).await?;
    let loaded = snapshot::load(&snap, config.system_user_id, config.failure_window).await?;
    snap.finish().await?;
    let snapshot_elapsed = snapshot_started.elapsed();
    let work: Vec<PresetPlan> = loaded
        .presets
        .into_iter()
        .map(|preset| {
            let actions = calculate_actions(&preset, loaded.now, config.backoff_interval);
            PresetPlan { preset, actions }
        })
        .collect();
    let results = join_all(work.iter().map(|item| async move {
        let mut conn = db.get().await?;
        let tx = db::begin(&mut conn, db.tx_limits()).await?;
        db::commit(tx).await?;
        let (done, result) = reconciler::apply(&mut conn, db.tx_limits(), config.system_user_id, item).await;
        result?;
        anyhow::Ok(done.created)
    }))
    .await;
    db::commit(lock).await?;
    let elapsed = started.elapsed();
    let (peak, samples) = sampler.finish().await?;
    let mut created = 0;
    for result in results {
        created += result?;
    }
    variant.cycles.push(elapsed);
    variant.snapshots.push(snapshot_elapsed);
    variant.created = created;
    variant.slots = work.len();
    variant.peak = variant.peak.max(peak);
    variant.samples += samples;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let bench = BenchDb::create(args.pool).await?;
    let result = run(&bench, &args).await;
    bench.drop_now().await?;
    result
}

async fn run(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let config = PrebuildsConfig::default();
    seed(bench, config.system_user_id).await?;
    let presets = TEMPLATES * VERSIONS_PER_TEMPLATE;

    let mut worker_config = Config::default();
    worker_config.database.pool_size = args.pool;
    let concurrency = Concurrency::from_config(&worker_config).prebuilds;
    let meter = opentelemetry::global::meter("bench");
    let settings =
        RuntimeConfig { jitter: 0.0, controls_refresh: Duration::ZERO, ..RuntimeConfig::default() };
    let rt = Runtime::new(bench.db.clone(), Health::default(), &meter, settings);
    let baseline_db = Db::new(&DatabaseConfig {
        url: bench.url.clone(),
        pool_size: args.baseline_pool,
        acquire_timeout: Duration::from_secs(120),
        ..DatabaseConfig::default()
    })?;

    let mut bounded = Variant::default();
    let mut steady = Variant::default();
    let mut baseline = Variant::default();
    for _ in 0..args.samples {
        reset(bench).await?;
        reconciler_cycle(bench, &rt, Reconciler::new(config.clone(), concurrency, &meter), &mut bounded)
            .await?;
        // The next cycle finds the 100 prebuilds starting: the steady state, nothing to write.
        reconciler_cycle(bench, &rt, Reconciler::new(config.clone(), concurrency, &meter), &mut steady)
            .await?;
        reset(bench).await?;
        baseline_cycle(bench, &baseline_db, &config, &mut baseline).await?;
    }
    anyhow::ensure!(bounded.created == 100 && baseline.created == 100, "each cycle creates 100 prebuilds");
    anyhow::ensure!(steady.created == 0, "the steady state creates nothing");

    let header = [
        "variant",
        "pool",
        "concurrency",
        "cycle p50 ms",
        "cycle max ms",
        "snapshot p50 ms",
        "created",
        "presets through the executor",
        "peak busy connections (sampled)",
    ];
    table(
        &format!(
            "One cycle: {presets} presets, 100 needing a prebuild, {CLAIMED} claimed + {DELETED} deleted workspaces ({} samples)",
            args.samples
        ),
        &header,
        &[
            bounded.row("**reconciler: skip idle, bounded**", args.pool, &concurrency.to_string()),
            steady.row("reconciler, next cycle (nothing to do)", args.pool, &concurrency.to_string()),
            baseline.row(
                "baseline: no skip, unbounded, a transaction per preset",
                args.baseline_pool,
                "unbounded",
            ),
        ],
    );
    println!(
        "\nTargets: cycle < 300 ms ({}), peak busy connections <= concurrency + 1 = {} ({}).",
        if quantile(&bounded.cycles, 1.0) < Duration::from_millis(300) { "met" } else { "NOT met" },
        concurrency + 1,
        if bounded.peak <= concurrency as i64 + 1 { "met" } else { "NOT met" },
    );
    Ok(())
}
