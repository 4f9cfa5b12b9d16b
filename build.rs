//! `refinery::embed_migrations!` reads `migrations/` at compile time, but cargo only rebuilds
//! when a source file changes: without this, a new migration file would be missing from the
//! binary (and from the tests' template database) until something else changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
