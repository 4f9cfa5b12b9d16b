//! Reliability suite: placeholder.

mod chaos_support;
mod common;
