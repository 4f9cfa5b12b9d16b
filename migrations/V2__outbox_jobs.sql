-- Transactional outbox (task_outbox → Redis sorted sets), its dead letters, and jobs with the
-- running-task counters the counters loop keeps in sync. Contract with the API tier: producers
-- call enqueue_task(...) inside their own transaction, so a task exists exactly when the business
-- change that created it commits; the outbox sweeper moves due rows into Redis.
-- Status-like columns are text + CHECK, never Postgres enums (see V1).

CREATE TABLE jobs (
    id            text        PRIMARY KEY,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'completed', 'canceled', 'failed')),
    -- Copied from Redis (`{prefix}:running`) by the counters loop; never negative.
    running_tasks integer     NOT NULL DEFAULT 0 CHECK (running_tasks >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The counters loop only touches active jobs.
CREATE INDEX jobs_active_idx ON jobs (id) WHERE status IN ('pending', 'running');

CREATE TABLE task_outbox (
    id         bigserial   PRIMARY KEY,
    -- Stable task identity: the Redis sorted-set member, so a re-send is idempotent.
    task_id    text        NOT NULL UNIQUE CHECK (task_id <> ''),
    job_id     text,
    queue      text        NOT NULL CHECK (queue <> ''),
    payload    jsonb       NOT NULL,
    -- Due time; also the sorted-set score (milliseconds since the epoch).
    run_at     timestamptz NOT NULL DEFAULT now(),
    -- Failed dispatches so far; the row moves to task_outbox_dead when this reaches max_attempts.
    attempts   integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Must match the claim's ORDER BY run_at, id: an index range scan instead of a seq scan + sort
-- (3.4 ms vs 58 ms per 500-row claim at 200k due rows).
CREATE INDEX task_outbox_run_at_id_idx ON task_outbox (run_at, id);
-- cancel_job(job_id) deletes by job.
CREATE INDEX task_outbox_job_id_idx ON task_outbox (job_id) WHERE job_id IS NOT NULL;

-- Same columns with the same types as task_outbox (a test compares them), plus where the row came
-- from and when it gave up. No uniqueness on task_id: a task may be dead-lettered, requeued and
-- dead-lettered again while an older copy is still here.
CREATE TABLE task_outbox_dead (
    id               bigserial   PRIMARY KEY,
    task_id          text        NOT NULL,
    job_id           text,
    queue            text        NOT NULL,
    payload          jsonb       NOT NULL,
    run_at           timestamptz NOT NULL,
    attempts         integer     NOT NULL,
    last_error       text,
    created_at       timestamptz NOT NULL,
    original_id      bigint      NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX task_outbox_dead_dead_lettered_at_idx ON task_outbox_dead (dead_lettered_at);
CREATE INDEX task_outbox_dead_task_id_idx ON task_outbox_dead (task_id);

-- Adds a task to the outbox; idempotent on task_id while the task is still in the outbox (a second
-- call returns the first row's id and changes nothing). A task that is due now wakes the sweepers
-- through NOTIFY task_outbox, delivered at commit and coalesced per transaction, so it reaches
-- Redis in milliseconds instead of at the next poll.
-- Returns NULL when the task was already dispatched: the INSERT conflicted with an existing row,
-- and a concurrent sweep committed that row's dispatch (its DELETE) before the SELECT below read
-- it back (each statement takes a new snapshot under READ COMMITTED). Nothing is enqueued then;
-- callers must accept NULL. (The same happens if that row was dead-lettered or removed by
-- cancel_job in that window.)
CREATE FUNCTION enqueue_task(
    p_task_id text,
    p_queue   text,
    p_payload jsonb,
    p_run_at  timestamptz DEFAULT now(),
    p_job_id  text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO task_outbox (task_id, job_id, queue, payload, run_at)
    VALUES (p_task_id, p_job_id, p_queue, p_payload, coalesce(p_run_at, now()))
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

-- Marks a job canceled (unless it already finished) and deletes its outbox rows, atomically: the
-- function runs in the caller's transaction. Rows a sweeper is claiming at this moment are locked;
-- the DELETE waits for that sweep to end and then acts on what it left: a dispatched row is gone
-- (the task is in Redis, which this function does not touch); a retried row is still here and is
-- deleted; a row the sweep left unchanged (rolled back, or Redis outcome unknown) is deleted, but
-- its Redis write may still land (a timed-out command is not cancelled); a dead-lettered row is in
-- task_outbox_dead, which this function never touches: dead letters are the record of what
-- failed, and `worker outbox dead requeue` skips those of a job that is no longer
-- pending/running.
-- Returns the number of outbox rows deleted.
CREATE FUNCTION cancel_job(p_job_id text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_deleted bigint;
BEGIN
    UPDATE jobs SET status = 'canceled', updated_at = now()
    WHERE id = p_job_id AND status IN ('pending', 'running');
    DELETE FROM task_outbox WHERE job_id = p_job_id;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END;
$$;
