//! The prebuilds schema (docs/database.md#the-schema): the migration applies, a whole prebuild
//! (template → version → preset → workspace → build → job) can be written, and the CHECK
//! constraints that stand in for enums reject values outside their set.

mod common;

use common::TestDb;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::{Conn, Exec};

/// SQLSTATE check_violation.
const CHECK_VIOLATION: &str = "23514";

/// One template with an active version and one preset on it; returns (template, version, preset).
async fn preset(conn: &Conn) -> (Uuid, Uuid, Uuid) {
    let template: Uuid = conn
        .fetch_one("INSERT INTO templates (name) VALUES ('python') RETURNING id", &[])
        .await
        .expect("template")
        .get(0);
    let version: Uuid = conn
        .fetch_one(
            "INSERT INTO template_versions (template_id, name) VALUES ($1, 'v1') RETURNING id",
            &[(&template, Type::UUID)],
        )
        .await
        .expect("version")
        .get(0);
    conn.exec(
        "UPDATE templates SET active_version_id = $1 WHERE id = $2",
        &[(&version, Type::UUID), (&template, Type::UUID)],
    )
    .await
    .expect("activate");
    let preset: Uuid = conn
        .fetch_one(
            "INSERT INTO presets (template_version_id, name, desired_instances, invalidate_after_secs) \
             VALUES ($1, 'small', 2, 3600) RETURNING id",
            &[(&version, Type::UUID)],
        )
        .await
        .expect("preset")
        .get(0);
    (template, version, preset)
}

fn sqlstate(result: Result<u64, worker::db::DbError>) -> Option<String> {
    result.err().and_then(|e| e.code().map(str::to_owned))
}

#[tokio::test]
async fn a_prebuild_with_its_build_and_job_can_be_written() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let (template, version, preset) = preset(&conn).await;
    conn.exec(
        "INSERT INTO preset_schedules (preset_id, cron_expression, desired_instances) \
         VALUES ($1, '* 9-17 * * 1-5', 5)",
        &[(&preset, Type::UUID)],
    )
    .await
    .expect("schedule");
    let system_user = Uuid::new_v4();
    conn.exec(
        "WITH w AS (INSERT INTO workspaces (owner_id, template_id, preset_id, name) \
                    VALUES ($1, $2, $3, 'prebuild-1') RETURNING id), \
              j AS (INSERT INTO provisioner_jobs DEFAULT VALUES RETURNING id) \
         INSERT INTO workspace_builds \
             (workspace_id, template_version_id, preset_id, transition, build_number, job_id, initiator_id) \
         SELECT w.id, $4, $3, 'start', 1, j.id, $1 FROM w, j",
        &[(&system_user, Type::UUID), (&template, Type::UUID), (&preset, Type::UUID), (&version, Type::UUID)],
    )
    .await
    .expect("prebuild");
    let row = conn
        .fetch_one(
            "SELECT b.transition, j.status FROM workspaces w \
             JOIN workspace_builds b ON b.workspace_id = w.id \
             JOIN provisioner_jobs j ON j.id = b.job_id \
             WHERE w.owner_id = $1 AND w.preset_id = $2 AND NOT w.deleted",
            &[(&system_user, Type::UUID), (&preset, Type::UUID)],
        )
        .await
        .expect("read back");
    assert_eq!(row.get::<_, String>(0), "start");
    assert_eq!(row.get::<_, String>(1), "pending", "a new job waits for a provisioner");
    let timezone: String =
        conn.fetch_one("SELECT scheduling_timezone FROM presets", &[]).await.expect("preset").get(0);
    assert_eq!(timezone, "UTC");
}

#[tokio::test]
async fn check_constraints_reject_statuses_outside_their_set() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let (_, _, preset) = preset(&conn).await;

    let bad_preset_status = conn
        .exec("UPDATE presets SET prebuild_status = 'broken' WHERE id = $1", &[(&preset, Type::UUID)])
        .await;
    assert_eq!(sqlstate(bad_preset_status).as_deref(), Some(CHECK_VIOLATION), "prebuild_status");

    let negative_desired =
        conn.exec("UPDATE presets SET desired_instances = -1 WHERE id = $1", &[(&preset, Type::UUID)]).await;
    assert_eq!(sqlstate(negative_desired).as_deref(), Some(CHECK_VIOLATION), "desired_instances");

    let bad_job_status = conn.exec("INSERT INTO provisioner_jobs (status) VALUES ('done')", &[]).await;
    assert_eq!(sqlstate(bad_job_status).as_deref(), Some(CHECK_VIOLATION), "job status");

    let finished_without_time =
        conn.exec("INSERT INTO provisioner_jobs (status) VALUES ('failed')", &[]).await;
    assert_eq!(
        sqlstate(finished_without_time).as_deref(),
        Some(CHECK_VIOLATION),
        "a finished job must have completed_at"
    );

    let bad_transition = conn
        .exec(
            "WITH w AS (INSERT INTO workspaces (owner_id, template_id, name) \
                        SELECT gen_random_uuid(), id, 'w' FROM templates RETURNING id), \
                  j AS (INSERT INTO provisioner_jobs DEFAULT VALUES RETURNING id) \
             INSERT INTO workspace_builds \
                 (workspace_id, template_version_id, transition, build_number, job_id, initiator_id) \
             SELECT w.id, v.id, 'restart', 1, j.id, gen_random_uuid() FROM w, j, template_versions v",
            &[],
        )
        .await;
    assert_eq!(sqlstate(bad_transition).as_deref(), Some(CHECK_VIOLATION), "transition");
}
