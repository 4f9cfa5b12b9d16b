//! The pgbouncer-safe statement policy (docs/database.md#statement-policy), checked where it can
//! silently regress: the source never calls tokio-postgres's named-statement paths, and the schema
//! never puts a non-built-in type (enum, domain, composite) on the wire.

mod common;

use std::path::Path;

use common::TestDb;
use worker::db::Exec;

/// Calls that prepare named statements, keep session state, or bypass `db::Exec`.
const FORBIDDEN: &[&str] = &[
    ".query(",
    ".query_one(",
    ".query_opt(",
    ".query_raw(",
    ".execute(",
    ".execute_raw(",
    ".prepare(",
    ".prepare_typed(",
    "prepare_cached(",
    "pg_advisory_lock(",
    "SET statement_timeout",
    "SET SESSION",
];

/// Look-alikes that are not database calls: removed from a line before it is checked.
const NOT_DATABASE: &[(&str, &str)] = &[("url.query()", "url::Url's query string accessor")];

/// The only files allowed to say what `FORBIDDEN` names, and why.
const EXEMPT: &[(&str, &str)] = &[
    ("src/db.rs", "implements Exec on top of the *_typed calls"),
    ("src/migrate.rs", "runs on a direct connection under a session advisory lock, never through pgbouncer"),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn source_never_uses_named_statements_or_session_state() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut offences = Vec::new();
    for path in files {
        let relative = path.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
        if EXEMPT.iter().any(|(file, _)| *file == relative) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read source");
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            let line =
                NOT_DATABASE.iter().fold(line.to_owned(), |l, (look_alike, _)| l.replace(look_alike, ""));
            for needle in FORBIDDEN {
                if line.contains(needle) {
                    offences.push(format!("{relative}:{}: `{needle}` in: {}", number + 1, line.trim()));
                }
            }
        }
    }
    assert!(offences.is_empty(), "statement policy violations (use db::Exec):\n{}", offences.join("\n"));
}

#[tokio::test]
async fn the_schema_has_no_enum_domain_or_composite_columns() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let offending = conn
        .fetch_all(
            "SELECT table_name::text || '.' || column_name::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND (data_type = 'USER-DEFINED' OR domain_name IS NOT NULL)",
            &[],
        )
        .await
        .expect("columns");
    let names: Vec<String> = offending.iter().map(|r| r.get(0)).collect();
    assert!(names.is_empty(), "non-built-in column types (use text + CHECK): {names:?}");
    let custom_types = conn
        .fetch_one(
            "SELECT count(*)::int8 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd')",
            &[],
        )
        .await
        .expect("types")
        .get::<_, i64>(0);
    assert_eq!(custom_types, 0, "enum or domain types exist in the schema");
}
