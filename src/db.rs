//! PostgreSQL access: the pool, the statement policy and the tick transaction helper.
//!
//! Statement policy (`docs/database.md`): every statement goes through [`Exec`], which only uses
//! tokio-postgres's `*_typed` family. Those send an unnamed Parse/Bind/Execute in one round trip
//! with the parameter types given by the caller, so no named prepared statement ever exists and
//! pgbouncer in transaction mode can route each transaction to any server connection. The
//! inherent `query`/`execute`/`prepare` methods are never called (a test greps for them).
//! Parameters and result columns must be built-in types: a Postgres enum or domain would make
//! tokio-postgres look the type up with a named statement, so status columns are `text` + CHECK.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    ClientWrapper, Hook, HookError, Manager, ManagerConfig, Metrics, Pool, PoolError, QueueMode,
    RecyclingMethod, Runtime, TimeoutType,
};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, RowStream};

use crate::text::with_causes;

mod config;
mod tls;

pub use config::DatabaseConfig;

pub use tls::{MakeRustls, RustlsStream, check as check_url};

pub use deadpool_postgres::{Object as Conn, Transaction};

/// One typed parameter: a value and its Postgres type.
pub type Param<'a> = (&'a (dyn ToSql + Sync), Type);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url: {0}")]
    Url(String),
    #[error("no database connection within the acquire timeout: {}", pool_text(.0))]
    Pool(#[from] PoolError),
    /// With its causes: tokio-postgres's own text is only the kind ("db error", "error
    /// performing TLS handshake"); the server message or certificate problem is in the source.
    #[error("{}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

/// A failed connect with its cause (deadpool shows only tokio-postgres's bare kind).
fn pool_text(error: &PoolError) -> String {
    match error {
        PoolError::Backend(e) => format!("cannot connect: {}", with_causes(e)),
        other => other.to_string(),
    }
}

impl DbError {
    /// The server's own message (e.g. a RAISE in a SQL function), when it sent one.
    pub fn server_message(&self) -> Option<&str> {
        match self {
            DbError::Postgres(e) => e.as_db_error().map(|e| e.message()),
            _ => None,
        }
    }

    /// The server refused the values themselves: a data exception (SQLSTATE class 22: a NUL
    /// character, a bad encoding, a number or time out of range), a NOT NULL or a CHECK
    /// violation. Writing the same values again fails again, unlike a lost connection or a
    /// timeout. Unique, foreign-key and exclusion violations are not in it: they depend on other
    /// rows (a sequence behind after a restore), so the same write can succeed later.
    pub fn is_refused_value(&self) -> bool {
        self.code().is_some_and(|code| code.starts_with("22") || code == "23502" || code == "23514")
    }

    /// No pooled connection became free within the acquire timeout: the pool is busy (the
    /// server may be fine).
    pub fn is_pool_busy(&self) -> bool {
        matches!(self, DbError::Pool(PoolError::Timeout(TimeoutType::Wait)))
    }

    /// The SQLSTATE, when the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            DbError::Postgres(e) => e.code().map(|c| c.code()),
            DbError::Pool(PoolError::Backend(e)) => e.code().map(|c| c.code()),
            _ => None,
        }
    }
}

/// The shared connection pool of all loops.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    limits: TxLimits,
    /// What the pool has seen of the server, shared with its check ([`verify_idle`]).
    evidence: Arc<Evidence>,
}

impl Db {
    /// Builds the pool; connections are opened lazily, so this does not touch the network.
    pub fn new(config: &DatabaseConfig) -> Result<Self, DbError> {
        let (mut pg, tls) = pg_config(&config.url)?;
        config.socket().apply(&mut pg);
        if pg.get_application_name().is_none() {
            pg.application_name("worker");
        }
        // Fast: a connection whose socket the client saw close (a restart, pg_terminate_backend,
        // a pooler restart: the server's FIN arrives with its FATAL message) is replaced. A
        // connection idle longer than `verify_after_idle` is also asked an empty query first
        // (`verify_idle`); one used since is not, because that check is a round trip and, to
        // PostgreSQL, a transaction: it doubled what an idle replica cost the server. After a
        // tick that timed out or failed on the database, every checkout verifies until the
        // server answers (`verify_next_checkout`).
        let manager =
            Manager::from_config(pg, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let evidence: Arc<Evidence> = Arc::default();
        let verify = verify_idle(config.verify_after_idle, config.connect_timeout, evidence.clone());
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .wait_timeout(Some(config.acquire_timeout))
            .create_timeout(Some(config.connect_timeout))
            // The most recently returned connection first: a quiet replica keeps reusing one warm
            // connection (never idle for long, so never verified) instead of cycling through all.
            .queue_mode(QueueMode::Lifo)
            .pre_recycle(verify)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Url(e.to_string()))?;
        Ok(Self { pool, limits: TxLimits::of(config), evidence })
    }

    pub async fn get(&self) -> Result<Conn, DbError> {
        let checkout = self.pool.get().await;
        match &checkout {
            Ok(conn) => {
                // A new connection's login is the server answering; a verified one recorded it in
                // `verify_idle`; a recent one handed out unverified says nothing.
                if deadpool_postgres::Object::metrics(conn).recycle_count == 0 {
                    self.evidence.answered();
                }
            }
            // A connect that failed or timed out. (No free slot in time says nothing about the
            // server; a failed check was recorded by `verify_idle`.)
            Err(PoolError::Backend(_) | PoolError::Timeout(TimeoutType::Create)) => {
                self.evidence.unanswered();
            }
            Err(_) => {}
        }
        Ok(checkout?)
    }

    /// Makes checkouts verify their connection (an empty query within `connect_timeout`), however
    /// recently it was used, until the server answers (a check, a new connection, a ping). The
    /// runtime calls it after a tick that timed out or failed on the database
    /// ([`crate::runtime::may_be_the_database`]): a warm connection on a path that went dead since
    /// (a frozen proxy or NAT) would otherwise be handed out unverified and hang the next tick
    /// too, and only a check that fails makes the pool connect anew, which tells the loops that
    /// the database cannot be reached ([`Db::unreachable`]) so they retry within seconds. A
    /// round trip for each checkout that starts before the first check answers.
    pub fn verify_next_checkout(&self) {
        self.evidence.doubt.store(true, Ordering::Relaxed);
    }

    /// Whether the server did not answer the last time the pool asked it something (a connect,
    /// a connection's check), until it answers again (a new connection's login, a check, a
    /// [`Db::ping`]): the runtime then retries failed ticks within seconds, so every loop
    /// resumes soon after the database returns (a silent path, a restart, a failover). A warm
    /// connection handed out unchecked is no answer either way.
    pub fn unreachable(&self) -> bool {
        lock(&self.evidence.reach).unreachable
    }

    /// Whether the database could not be reached at some time since `at`: it cannot now, or it
    /// came back after `at`. A tick that started in an outage and failed just after the return
    /// (its wait for a connection ran out, say) backs off as in the outage, not for 30 s.
    pub fn unreachable_since(&self, at: Instant) -> bool {
        lock(&self.evidence.reach).unreachable_since(at)
    }

    /// When the server last answered the pool: a connection's check, a new connection's login,
    /// a ping. Readiness takes it as a ping. (A recently used connection is handed out
    /// unverified, which is no evidence: a quiet replica's readiness pings for itself.)
    pub fn last_answered(&self) -> Option<Instant> {
        lock(&self.evidence.reach).answered_at
    }

    pub fn statement_timeout(&self) -> Duration {
        self.limits.statement
    }

    /// The bounds [`begin`] puts on each transaction.
    pub fn tx_limits(&self) -> TxLimits {
        self.limits
    }

    pub fn status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }

    /// `SELECT 1`, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        let conn = self.get().await?;
        conn.fetch_one("SELECT 1::int4", &[]).await?;
        self.evidence.answered();
        Ok(())
    }
}

/// What the pool has seen of the server, and whether it doubts its warm connections.
#[derive(Debug, Default)]
struct Evidence {
    reach: Mutex<Reachability>,
    /// Checkouts verify their connection however recently it was used
    /// ([`Db::verify_next_checkout`]), until the server answers.
    doubt: AtomicBool,
}

impl Evidence {
    fn answered(&self) {
        lock(&self.reach).answered(Instant::now());
        self.doubt.store(false, Ordering::Relaxed);
    }

    fn unanswered(&self) {
        lock(&self.reach).unanswered();
    }
}

/// Whether the server could be reached, as the pool found it.
#[derive(Debug, Default)]
struct Reachability {
    /// The server did not answer the last time it was asked.
    unreachable: bool,
    /// When it answered last.
    answered_at: Option<Instant>,
    /// When it first answered after not answering.
    returned_at: Option<Instant>,
}

impl Reachability {
    fn unanswered(&mut self) {
        self.unreachable = true;
    }

    fn answered(&mut self, now: Instant) {
        self.answered_at = Some(now);
        if std::mem::take(&mut self.unreachable) {
            self.returned_at = Some(now);
        }
    }

    fn unreachable_since(&self, at: Instant) -> bool {
        self.unreachable || self.returned_at.is_some_and(|returned| returned >= at)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pool's check before it hands out a pooled connection again: one idle longer than `after`
/// must answer an empty query within `bound`, else it is dropped and the pool tries the next
/// (or opens one). The bound matters on a half-open path (a frozen NAT or proxy: no RST, no
/// FIN), where the query would wait forever and so would the checkout; the tick's own timeout
/// caps the total. A connection used within `after` is handed out on its open socket alone
/// (unless in doubt, [`Db::verify_next_checkout`]): should the path have died since, its first
/// statement fails or is bounded by the tick's timeout, and TCP's user timeout closes it
/// (`database.tcp_user_timeout`). A check that fails counts as the server not answering
/// ([`Db::unreachable`]), so a tick that spends its time on several such checks still backs off
/// as in an outage.
fn verify_idle(after: Duration, bound: Duration, evidence: Arc<Evidence>) -> Hook {
    Hook::async_fn(move |client: &mut ClientWrapper, metrics: &Metrics| {
        let evidence = evidence.clone();
        Box::pin(async move {
            let doubted = evidence.doubt.load(Ordering::Relaxed);
            if client.is_closed() || (metrics.last_used() < after && !doubted) {
                // A closed one is refused by the Fast recycle right after this.
                return Ok(());
            }
            match tokio::time::timeout(bound, client.simple_query("")).await {
                Ok(Ok(_)) => {
                    evidence.answered();
                    Ok(())
                }
                Ok(Err(e)) => {
                    evidence.unanswered();
                    Err(HookError::Backend(e))
                }
                Err(_) => {
                    evidence.unanswered();
                    Err(HookError::message(format!(
                        "an idle pooled connection did not answer its check within {bound:?}"
                    )))
                }
            }
        })
    })
}

/// What bounds a transaction on the server: each statement (`statement_timeout`) and each wait
/// for the client's next statement (`idle_in_transaction_session_timeout`). The second is what
/// ends a transaction whose client is gone without a word (a silent path, a frozen worker):
/// without it the server holds that transaction's locks until its own TCP notices, for hours,
/// and every tick that needs one of those rows fails meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLimits {
    pub statement: Duration,
    pub idle: Duration,
}

impl TxLimits {
    pub fn of(config: &DatabaseConfig) -> Self {
        Self { statement: config.statement_timeout, idle: config.idle_in_transaction_timeout }
    }

    /// The `SET LOCAL`s that apply the limits, both in one message (the round trip the statement
    /// timeout alone already cost; `begin_snapshot` sends them with its `BEGIN`). Local, so
    /// nothing leaks to the next user of a pgbouncer server connection.
    fn set_local(self) -> String {
        // Plain integers (milliseconds) cannot carry SQL, so formatting them into the text is safe.
        format!(
            "SET LOCAL statement_timeout = {}; SET LOCAL idle_in_transaction_session_timeout = {}",
            self.statement.as_millis().max(1),
            self.idle.as_millis().max(1)
        )
    }
}

/// Begins a transaction bounded by `limits` ([`TxLimits`]). A transaction dropped without commit
/// is rolled back by tokio-postgres before the connection is reused.
pub async fn begin(conn: &mut Conn, limits: TxLimits) -> Result<Transaction<'_>, DbError> {
    let tx = conn.transaction().await?;
    tx.batch_execute(&limits.set_local()).await?;
    Ok(tx)
}

/// A REPEATABLE READ, read-only transaction that owns its pooled connection: one consistent
/// snapshot that the holder ends when it is done reading ([`Snapshot::finish`]), so a
/// reconciler can read its state, give the connection back, and only then fan out its writes.
/// Dropped without `finish` (an error, a cancelled tick), its connection is closed rather than
/// returned to the pool mid-transaction; the server rolls the transaction back.
pub struct Snapshot {
    conn: Option<Conn>,
}

/// Begins a [`Snapshot`] bounded by the pool's [`TxLimits`].
pub async fn begin_snapshot(db: &Db) -> Result<Snapshot, DbError> {
    let conn = db.get().await?;
    // SET LOCAL takes no snapshot: the first query of the holder does.
    conn.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}",
        db.tx_limits().set_local()
    ))
    .await?;
    Ok(Snapshot { conn: Some(conn) })
}

impl Snapshot {
    fn conn(&self) -> &Conn {
        // Only `finish` (which consumes self) and `drop` take the connection out.
        self.conn.as_ref().expect("a snapshot holds its connection until finished")
    }

    /// Ends the snapshot and returns the connection to the pool.
    pub async fn finish(mut self) -> Result<(), DbError> {
        if let Some(conn) = self.conn.take() {
            conn.batch_execute("COMMIT").await?;
        }
        Ok(())
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}

impl Exec for Snapshot {
    async fn fetch_all(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
        self.conn().fetch_all(sql, params).await
    }
    async fn fetch_one(&self, sql: &str, params: &[Param<'_>]) -> Result<Row, DbError> {
        self.conn().fetch_one(sql, params).await
    }
    async fn fetch_opt(&self, sql: &str, params: &[Param<'_>]) -> Result<Option<Row>, DbError> {
        self.conn().fetch_opt(sql, params).await
    }
    async fn exec(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, DbError> {
        self.conn().exec(sql, params).await
    }
    async fn fetch_stream(&self, sql: &str, params: &[Param<'_>]) -> Result<RowStream, DbError> {
        self.conn().fetch_stream(sql, params).await
    }
}

/// Commits `tx`; the one place a commit error becomes a [`DbError`].
pub async fn commit(tx: Transaction<'_>) -> Result<(), DbError> {
    Ok(tx.commit().await?)
}

/// The short transaction most statements run in: a pooled connection, [`begin`] (bounded by
/// `database.statement_timeout`), `work`, [`commit`]. An error from `work` rolls back: the
/// transaction is dropped uncommitted. Callers that hold a connection across several
/// transactions, or keep one open across a tick (the leader lock), use [`begin`] themselves.
pub async fn in_transaction<T, E>(
    db: &Db,
    work: impl AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<DbError>,
{
    let mut conn = db.get().await?;
    let tx = begin(&mut conn, db.tx_limits()).await?;
    let value = work(&tx).await?;
    commit(tx).await?;
    Ok(value)
}

/// `pg_try_advisory_xact_lock(key)` inside `tx`: held until the transaction ends, never a
/// session lock (which pgbouncer's transaction mode would leak to another client).
pub async fn try_xact_lock(tx: &Transaction<'_>, key: i64) -> Result<bool, DbError> {
    const SQL: &str = "SELECT pg_try_advisory_xact_lock($1)";
    let row = tx.fetch_one(SQL, &[(&key, Type::INT8)]).await?;
    Ok(row.get(0))
}

/// The only way this crate runs a statement. Method names differ from tokio-postgres's inherent
/// `query`/`execute` on purpose: an inherent method would win method resolution silently.
pub trait Exec: Sync {
    fn fetch_all(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Vec<Row>, DbError>> + Send;

    fn fetch_one(&self, sql: &str, params: &[Param<'_>])
    -> impl Future<Output = Result<Row, DbError>> + Send;

    fn fetch_opt(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<Option<Row>, DbError>> + Send;

    /// Runs a statement and returns the number of rows it affected.
    fn exec(&self, sql: &str, params: &[Param<'_>]) -> impl Future<Output = Result<u64, DbError>> + Send;

    /// Runs a query whose rows are read as they arrive: the connection reads no further ahead
    /// than the consumer, so a large result is never held whole (nor grows the connection's read
    /// buffer for good). Poll the stream pinned (`std::pin::pin!`), and read it to the end (or
    /// drop it) before the next statement on this connection: an unread live stream holds the
    /// connection, so that statement, the commit, or the pool's next user would wait on it.
    fn fetch_stream(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> impl Future<Output = Result<RowStream, DbError>> + Send;
}

macro_rules! impl_exec {
    ($($ty:ty),*) => {$(
        impl Exec for $ty {
            async fn fetch_all(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
                Ok(self.query_typed(sql, params).await?)
            }
            async fn fetch_one(&self, sql: &str, params: &[Param<'_>]) -> Result<Row, DbError> {
                Ok(self.query_typed_one(sql, params).await?)
            }
            async fn fetch_opt(&self, sql: &str, params: &[Param<'_>]) -> Result<Option<Row>, DbError> {
                Ok(self.query_typed_opt(sql, params).await?)
            }
            async fn exec(&self, sql: &str, params: &[Param<'_>]) -> Result<u64, DbError> {
                Ok(self.execute_typed(sql, params).await?)
            }
            async fn fetch_stream(&self, sql: &str, params: &[Param<'_>]) -> Result<RowStream, DbError> {
                Ok(self.query_typed_raw(sql, params.iter().cloned()).await?)
            }
        }
    )*};
}

impl_exec!(tokio_postgres::Client, tokio_postgres::Transaction<'_>, Conn, Transaction<'_>);

/// Reads a PostgreSQL URL with libpq's TLS options (`sslmode=disable|prefer|require|verify-ca|
/// verify-full`, `sslrootcert=<file>|system`, `sslcert`, `sslkey`; see `db/tls.rs`): the
/// driver's config and the TLS connector for it. The pool, the LISTEN connection and migrations
/// all connect through this, so one URL means the same thing everywhere.
pub fn pg_config(url: &str) -> Result<(tokio_postgres::Config, MakeRustls), DbError> {
    tls::parse(url).map_err(DbError::Url)
}

/// How every connection to PostgreSQL opens and keeps its socket (`[database]`): opening is
/// bounded, and a connection whose path goes silent (packets dropped, no RST, no FIN: a dead NAT
/// entry, a failed-over load balancer, a cut cable) is noticed by the kernel within about
/// `keepalives_idle + tcp_user_timeout`, instead of waiting on it for hours (Linux's defaults:
/// no keepalives for 2 h, retransmissions for about 15 min). Values from the config win over
/// the same options in a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketSettings {
    /// Opening a connection: the TCP connect, TLS and the login (the pool bounds its creates by
    /// it too).
    pub connect_timeout: Duration,
    pub keepalives_idle: Duration,
    pub keepalives_interval: Duration,
    pub keepalives_retries: u32,
    pub tcp_user_timeout: Duration,
}

impl Default for SocketSettings {
    fn default() -> Self {
        DatabaseConfig::default().socket()
    }
}

impl SocketSettings {
    fn apply(&self, pg: &mut tokio_postgres::Config) {
        pg.connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(self.keepalives_idle)
            .keepalives_interval(self.keepalives_interval)
            .keepalives_retries(self.keepalives_retries)
            .tcp_user_timeout(self.tcp_user_timeout);
    }
}

/// A direct (unpooled) connection to open: LISTEN and migrations need one (session state), with
/// the URL and socket settings of `[database]` ([`DatabaseConfig::listen_direct`],
/// [`DatabaseConfig::migrate_direct`]). A bare URL converts with the default settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direct {
    pub url: String,
    pub socket: SocketSettings,
}

impl From<&str> for Direct {
    fn from(url: &str) -> Self {
        Self { url: url.to_owned(), socket: SocketSettings::default() }
    }
}

impl From<String> for Direct {
    fn from(url: String) -> Self {
        Self { url, socket: SocketSettings::default() }
    }
}

/// The driver's side of a direct connection: poll it (or spawn it) for the client to work.
pub type DirectConnection =
    tokio_postgres::Connection<tokio_postgres::Socket, RustlsStream<tokio_postgres::Socket>>;

/// A direct connection that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// The driver bounds only the TCP connect; a path that accepts and then stays silent would
    /// otherwise hold the TLS handshake or the login forever.
    #[error("no connection within database.connect_timeout ({})", humantime::format_duration(*.0))]
    Timeout(Duration),
}

impl Direct {
    /// Opens the connection (TCP, TLS and login within `connect_timeout`) and returns its driver
    /// for the caller to poll.
    pub async fn open(
        &self,
        application_name: &str,
    ) -> Result<(tokio_postgres::Client, DirectConnection), ConnectError> {
        let (mut pg, tls) = pg_config(&self.url)?;
        self.socket.apply(&mut pg);
        pg.application_name(application_name);
        let timeout = self.socket.connect_timeout;
        match tokio::time::timeout(timeout, pg.connect(tls)).await {
            Ok(connected) => Ok(connected.map_err(DbError::from)?),
            Err(_) => Err(ConnectError::Timeout(timeout)),
        }
    }

    /// Opens the connection and drives it on a background task.
    pub async fn connect(&self, application_name: &str) -> Result<tokio_postgres::Client, ConnectError> {
        let (client, connection) = self.open(application_name).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "direct connection closed");
            }
        });
        Ok(client)
    }
}

/// Opens one direct connection to `url` with the default socket settings (tools and tests),
/// driving it on a background task.
pub async fn connect_direct(
    url: &str,
    application_name: &str,
) -> Result<tokio_postgres::Client, ConnectError> {
    Direct::from(url).connect(application_name).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_that_overlapped_an_outage_counts_as_in_it_until_the_next_one_starts() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        let mut reach = Reachability::default();
        assert!(!reach.unreachable_since(start), "nothing failed yet");
        reach.unanswered();
        assert!(reach.unreachable && reach.unreachable_since(later(100)), "unreachable now");
        reach.answered(later(10));
        assert!(!reach.unreachable);
        assert!(reach.unreachable_since(later(9)), "a tick that started before the return");
        assert!(reach.unreachable_since(later(10)));
        assert!(!reach.unreachable_since(later(11)), "a tick that started after it");
        reach.answered(later(20));
        assert!(reach.unreachable_since(later(9)), "another answer is no new return");
        assert_eq!(reach.answered_at, Some(later(20)));
    }

    #[test]
    fn the_limits_are_set_in_whole_milliseconds_and_never_zero() {
        let limits = TxLimits { statement: Duration::from_micros(1500), idle: Duration::ZERO };
        assert_eq!(
            limits.set_local(),
            "SET LOCAL statement_timeout = 1; SET LOCAL idle_in_transaction_session_timeout = 1"
        );
    }
}
