//! The `worker` command line. `main` only parses, loads config and dispatches.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use serde_json::json;
use worker::audit::{self, Action, Actor, AuditCommand};
use worker::chats::cli::ChatCommand;
use worker::config::{self, Config, ConfigInputs, Loaded};
use worker::db::Db;
use worker::gitsync::cli::GitsyncCommand;
use worker::outbox::cli::OutboxCommand;
use worker::prebuilds::cli::PrebuildsCommand;
use worker::{chats, controls, daemon, gitsync, migrate, outbox, prebuilds, status, telemetry};

#[derive(Parser, Debug)]
#[command(name = "worker", version = worker::identity::LONG_VERSION, about = "Control-plane daemon of the chat platform")]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug)]
struct GlobalArgs {
    /// Config file (default: $WORKER_CONFIG, else config/worker.toml when it exists).
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Override any key, e.g. `--set outbox.batch_size=100` (highest precedence; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    /// Shorthand for `--set database.url=…`.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Shorthand for `--set log.level=…`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Who runs a state-changing command, as the audit trail records it (default:
    /// `$USER@hostname`).
    #[arg(long, value_name = "NAME", global = true)]
    actor: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate or show the effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    #[command(flatten)]
    Online(OnlineCommand),
}

/// Commands that need the async runtime (and usually the database).
#[derive(Subcommand, Debug)]
enum OnlineCommand {
    /// Run the daemon (the default).
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Pause, resume or list loops on every replica.
    #[command(subcommand, name = "loop")]
    Loop(LoopCommand),
    /// Outbox backlog and dead letters.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// List, start, message and follow chats; quotas and the admission queue.
    #[command(subcommand)]
    Chat(ChatCommand),
    /// Pull-request status refresh: backlog, or mark one chat due now.
    #[command(subcommand)]
    Gitsync(GitsyncCommand),
    /// Prebuilds per preset, what the reconciler's next cycle would do, and preset invalidation.
    #[command(subcommand)]
    Prebuilds(PrebuildsCommand),
    /// The audit trail of state-changing commands (operator_actions).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Registered workers (with the age of their lease) and paused loops.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// GET this worker's own /healthz (on health.listen; 127.0.0.1 for 0.0.0.0): exit 0 on 200,
    /// else 1. The container's HEALTHCHECK.
    Health,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Exit 0 if the configuration is valid, else print why and exit 1.
    Check,
    /// Print the effective configuration (secrets redacted) with the source of every value.
    Print,
}

#[derive(Subcommand, Debug)]
enum LoopCommand {
    /// Stop a loop from ticking on every replica (takes effect at its next tick).
    Pause {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a paused loop tick again.
    Resume { name: String },
    /// Show paused/resumed loops.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Before anything reads a secret: a process of the same user (an agent) cannot read this
    // one's environment, memory or descriptors through /proc, nor ptrace it.
    if let Err(error) = chats::boundary::forbid_inspection() {
        eprintln!("error: cannot mark the worker non-dumpable (PR_SET_DUMPABLE): {error}");
        return ExitCode::from(1);
    }
    // In a container the worker is PID 1 (`scripts/start.sh` execs it): a minimal init stays
    // behind to reap orphans and forward signals; this process goes on as the worker.
    if let Err(error) = worker::init::serve_as_pid_one() {
        eprintln!("error: cannot start the worker under its own init (as PID 1): {error}");
        return ExitCode::from(1);
    }
    // The lease guard the chat loops start (`chats::guard`): no config, no runtime, no log
    // subscriber; not a user-facing command, so not in the help.
    if std::env::args_os().nth(1).is_some_and(|arg| arg == chats::guard::SUBCOMMAND) {
        return ExitCode::from(u8::try_from(chats::guard::run()).unwrap_or(1));
    }
    let cli = Cli::parse();
    match load_config(&cli.global) {
        Err(error) => {
            eprintln!("error: {}", worker::text::with_causes(error.as_ref()));
            ExitCode::from(1)
        }
        Ok(loaded) => match execute(
            cli.command.unwrap_or(Command::Online(OnlineCommand::Run)),
            loaded,
            cli.global.actor,
        ) {
            Ok(code) => ExitCode::from(code),
            Err(error) => {
                eprintln!("error: {}", worker::text::with_causes(error.as_ref()));
                ExitCode::from(1)
            }
        },
    }
}

/// `--database-url` is convenient but puts the URL, password included, where any local user can
/// read it.
const ARGV_WARNING: &str = "warning: --database-url puts the URL, and any password in it, in this \
     process's argv, which every user of the machine can read (ps, /proc/<pid>/cmdline); set the \
     DATABASE_URL environment variable instead";

fn load_config(global: &GlobalArgs) -> anyhow::Result<Loaded> {
    let mut inputs = ConfigInputs::from_process(global.config.clone());
    for assignment in &global.set {
        let (key, value) = assignment.split_once('=').with_context(|| {
            format!("--set `{assignment}`: expected KEY=VALUE, e.g. outbox.batch_size=100")
        })?;
        inputs = inputs.flag(key.trim(), value.trim(), &format!("--set {}", key.trim()));
    }
    if let Some(url) = &global.database_url {
        eprintln!("{ARGV_WARNING}");
        inputs = inputs.flag("database.url", url, "--database-url");
    }
    if let Some(level) = &global.log_level {
        inputs = inputs.flag("log.level", level, "--log-level");
    }
    Ok(config::load(&inputs)?)
}

fn execute(command: Command, loaded: Loaded, actor: Option<String>) -> anyhow::Result<u8> {
    // Config commands must work without a runtime, a database or a log subscriber.
    let command = match command {
        Command::Config(ConfigCommand::Check) => {
            for warning in &loaded.warnings {
                eprintln!("warning: {warning}");
            }
            println!("config ok");
            return Ok(0);
        }
        Command::Config(ConfigCommand::Print) => {
            print!("{}", loaded.config.render(&loaded.sources));
            return Ok(0);
        }
        Command::Online(command) => command,
    };
    telemetry::init_tracing(&loaded.config.log)?;
    // The commands that open the daemon's connections say what risk the config accepts.
    if matches!(command, OnlineCommand::Run | OnlineCommand::Migrate) {
        for warning in &loaded.warnings {
            tracing::warn!(%warning, "a production floor is relaxed by config");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Refused before anything runs: a state-changing command could not record who ran it.
    let actor = Actor::of_process(actor.as_deref())?;
    runtime.block_on(execute_async(command, loaded.config, actor))
}

async fn execute_async(command: OnlineCommand, config: Config, actor: Actor) -> anyhow::Result<u8> {
    match command {
        OnlineCommand::Run => {
            let env = std::env::vars().collect();
            let code = daemon::run(config, env).await?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        OnlineCommand::Migrate => {
            let applied = migrate::run(&config.database).await?;
            if applied.is_empty() {
                println!("migrations up to date");
            }
            for name in applied {
                println!("applied {name}");
            }
            Ok(0)
        }
        OnlineCommand::Loop(command) => {
            let db = Db::new(&config.database)?;
            match command {
                LoopCommand::Pause { name, reason } => {
                    let arguments =
                        json!({ "name": audit::typed(&name), "reason": reason.as_deref().map(audit::typed) });
                    audit::run(&db, &actor, Action::new("loop pause", arguments), async |tx| {
                        controls::set_paused(tx, &name, true, reason.as_deref(), actor.as_str()).await?;
                        Ok::<_, controls::ControlError>(((), Some(1)))
                    })
                    .await?;
                    println!("paused {name} on every replica (effective at its next tick)");
                }
                LoopCommand::Resume { name } => {
                    let arguments = json!({ "name": audit::typed(&name) });
                    audit::run(&db, &actor, Action::new("loop resume", arguments), async |tx| {
                        controls::set_paused(tx, &name, false, None, actor.as_str()).await?;
                        Ok::<_, controls::ControlError>(((), Some(1)))
                    })
                    .await?;
                    println!("resumed {name}");
                }
                LoopCommand::List { json } => {
                    let list = controls::list(&db).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else {
                        println!("{:<16} {:<7} {:<22} {:<20} REASON", "LOOP", "PAUSED", "UPDATED", "BY");
                        for c in list {
                            println!(
                                "{:<16} {:<7} {:<22} {:<20} {}",
                                c.loop_name, c.paused, c.updated_at, c.updated_by, c.reason
                            );
                        }
                    }
                }
            }
            Ok(0)
        }
        OnlineCommand::Outbox(command) => {
            let db = Db::new(&config.database)?;
            outbox::cli::run(&db, &actor, &command, &mut std::io::stdout().lock()).await?;
            Ok(0)
        }
        OnlineCommand::Chat(command) => {
            // Registered before any output, so a signal during `tail --follow` ends it cleanly.
            let shutdown = chats::cli::interrupted()?;
            let db = Db::new(&config.database)?;
            let listen = config.database.listen_direct();
            let out = &mut std::io::stdout().lock();
            chats::cli::run(&db, &actor, &config.chats, listen, &command, out, shutdown).await?;
            Ok(0)
        }
        OnlineCommand::Gitsync(command) => {
            let db = Db::new(&config.database)?;
            let (mut stdin, mut stdout) = (std::io::stdin().lock(), std::io::stdout().lock());
            gitsync::cli::run(&db, &actor, &config.gitsync, &command, &mut stdin, &mut stdout).await?;
            Ok(0)
        }
        OnlineCommand::Prebuilds(command) => {
            let db = Db::new(&config.database)?;
            prebuilds::cli::run(&db, &actor, &config.prebuilds, &command, &mut std::io::stdout().lock())
                .await?;
            Ok(0)
        }
        OnlineCommand::Audit(command) => {
            let db = Db::new(&config.database)?;
            audit::cli(&db, &command, &mut std::io::stdout().lock()).await?;
            Ok(0)
        }
        OnlineCommand::Health => {
            let url = worker::health::check_own(&config.health).await?;
            println!("healthy: GET {url} answered 200");
            Ok(0)
        }
        OnlineCommand::Status { json } => {
            let fleet = status::fleet(&Db::new(&config.database)?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fleet)?);
            } else {
                print!("{}", fleet.render());
            }
            Ok(0)
        }
    }
}
