-- Traces across the outbox (issue 20): a producer that traces passes its W3C traceparent to
-- enqueue_task, the row keeps it, and the sweep that moves the row to Redis links its span to it
-- (docs/traces.md). Nullable: a producer that does not trace passes nothing.
--
-- The stored form is a version-00 traceparent with non-zero ids, exactly what the W3C Trace
-- Context spec accepts. enqueue_task stores an unusable value as NULL with a WARNING naming it
-- instead of refusing the task: tracing is optional and must never cost a producer its task.
ALTER TABLE task_outbox ADD COLUMN traceparent text
    CONSTRAINT task_outbox_traceparent_w3c CHECK (
        traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        AND substr(traceparent, 4, 32) <> repeat('0', 32)
        AND substr(traceparent, 37, 16) <> repeat('0', 16));
-- Same columns with the same types as task_outbox (V2; a test compares them): a dead letter
-- keeps its traceparent and a requeue carries it back (the same check, so a requeue cannot fail
-- on it).
ALTER TABLE task_outbox_dead ADD COLUMN traceparent text
    CONSTRAINT task_outbox_dead_traceparent_w3c CHECK (
        traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        AND substr(traceparent, 4, 32) <> repeat('0', 32)
        AND substr(traceparent, 37, 16) <> repeat('0', 16));

-- A new argument cannot be added by CREATE OR REPLACE, and a second overload with defaults
-- would make every existing call ambiguous, so the function is dropped and created again.
-- Dropping it drops the privileges granted on it: they are copied to the new function (an
-- operator who revoked EXECUTE from PUBLIC and granted it to the API role keeps exactly that).
CREATE TEMP TABLE enqueue_task_acl AS
    SELECT p.proacl IS NULL AS default_acl, a.grantee, a.privilege_type, a.is_grantable
    FROM pg_proc AS p LEFT JOIN LATERAL aclexplode(p.proacl) AS a ON true
    WHERE p.oid = 'enqueue_task(text, text, jsonb, timestamptz, text)'::regprocedure;

DROP FUNCTION enqueue_task(text, text, jsonb, timestamptz, text);

-- As in V8, plus p_traceparent.
CREATE FUNCTION enqueue_task(
    p_task_id     text,
    p_queue       text,
    p_payload     jsonb,
    p_run_at      timestamptz DEFAULT now(),
    p_job_id      text DEFAULT NULL,
    p_traceparent text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id          bigint;
    v_bytes       bigint;
    v_max         bigint;
    v_traceparent text := lower(btrim(p_traceparent));
BEGIN
    IF NOT isfinite(coalesce(p_run_at, now())) THEN
        RAISE EXCEPTION 'enqueue_task(%): run_at must be a finite time, not %', p_task_id, p_run_at
            USING ERRCODE = '22008', HINT = 'pass now() or NULL for a task that is due at once';
    END IF;
    v_bytes := octet_length(p_payload::text);
    SELECT max_payload_bytes INTO v_max FROM outbox_settings;
    v_max := coalesce(v_max, 1048576);
    IF v_bytes > v_max THEN
        RAISE EXCEPTION 'enqueue_task(%): payload is % bytes, over the limit of % bytes', p_task_id, v_bytes, v_max
            USING ERRCODE = '54000',
                  HINT = 'store large data elsewhere and enqueue a reference to it; the limit is the '
                         'workers'' outbox.max_payload_bytes (table outbox_settings)';
    END IF;
    IF v_traceparent = '' THEN
        v_traceparent := NULL;
    ELSIF NOT (v_traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
               AND substr(v_traceparent, 4, 32) <> repeat('0', 32)
               AND substr(v_traceparent, 37, 16) <> repeat('0', 16)) THEN
        RAISE WARNING 'enqueue_task(%): traceparent % is not a W3C version-00 traceparent; stored as NULL',
            p_task_id, p_traceparent;
        v_traceparent := NULL;
    END IF;
    INSERT INTO task_outbox (task_id, job_id, queue, payload, run_at, traceparent)
    VALUES (p_task_id, p_job_id, p_queue, p_payload, coalesce(p_run_at, now()), v_traceparent)
    ON CONFLICT (task_id) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM task_outbox WHERE task_id = p_task_id;
        RETURN v_id;
    END IF;
    IF coalesce(p_run_at, now()) <= now() THEN
        PERFORM pg_notify('task_outbox', '');
    END IF;
    RETURN v_id;
END;
$$;

DO $$
DECLARE
    grant_row record;
BEGIN
    -- NULL proacl: the defaults (EXECUTE for PUBLIC), which the new function has too.
    IF (SELECT bool_and(default_acl) FROM enqueue_task_acl) THEN
        RETURN;
    END IF;
    REVOKE ALL ON FUNCTION enqueue_task(text, text, jsonb, timestamptz, text, text) FROM PUBLIC;
    FOR grant_row IN
        SELECT grantee, is_grantable FROM enqueue_task_acl WHERE privilege_type = 'EXECUTE'
    LOOP
        EXECUTE format(
            'GRANT EXECUTE ON FUNCTION enqueue_task(text, text, jsonb, timestamptz, text, text) TO %s%s',
            CASE WHEN grant_row.grantee = 0 THEN 'PUBLIC' ELSE grant_row.grantee::regrole::text END,
            CASE WHEN grant_row.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END;
$$;

DROP TABLE enqueue_task_acl;
