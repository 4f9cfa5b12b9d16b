-- Bounded payloads (issue 18): enqueue_task refuses a payload over `outbox.max_payload_bytes`,
-- with an error naming the task and the size, so one producer cannot hand every sweeper (and
-- Redis) a payload of any size.
--
-- How the limit reaches the database: the SQL function cannot read the worker's TOML, so the
-- worker writes its `outbox.max_payload_bytes` into the one-row table below (the outbox loop, on
-- its first tick, and only when the value differs), and enqueue_task reads it there. The default
-- here (1 MiB, the config's default) holds until a worker has written it, and for deployments
-- without the outbox loop.
--
-- Why one row and last writer wins, with many replicas: the limit is a property of the producer
-- contract, so it must be one value for every caller, not per worker. Replicas should all carry
-- the same setting; during a rolling change the row holds whichever replica wrote last (each
-- write is logged with the old and the new value). That is safe whatever the row says: the limit
-- only decides which NEW payloads are refused, and a row already in the outbox always moves,
-- because the sweeper's byte budget (`outbox.max_batch_bytes`) admits at least one row per
-- batch whatever its size.
CREATE TABLE outbox_settings (
    -- One row: the primary key can only be true.
    id                boolean     PRIMARY KEY DEFAULT true CHECK (id),
    -- Largest payload enqueue_task accepts, in bytes of its JSON text (what reaches Redis).
    max_payload_bytes bigint      NOT NULL CHECK (max_payload_bytes > 0),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

INSERT INTO outbox_settings (max_payload_bytes) VALUES (1048576);

-- As in V6, plus the payload bound. The size is the byte length of the payload's JSON text
-- (payload::text, exactly what the sweeper sends to Redis), checked before anything is written,
-- also for a task id that is already in the outbox. SQLSTATE 54000 (program_limit_exceeded).
CREATE OR REPLACE FUNCTION enqueue_task(
    p_task_id text,
    p_queue   text,
    p_payload jsonb,
    p_run_at  timestamptz DEFAULT now(),
    p_job_id  text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id    bigint;
    v_bytes bigint;
    v_max   bigint;
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
