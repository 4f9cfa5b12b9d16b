-- A task is due at a finite time. enqueue_task accepted '-infinity', and such a row then failed
-- every claim (its sorted-set score, milliseconds since the epoch, does not exist) and, sorting
-- first, stopped the outbox of every replica; 'infinity' is a task that is never due: lost in
-- all but name. Found by the reliability suite (tests/chaos_input.rs).
--
-- Rows already here are settled first, so nothing is lost: one due at -infinity is due now; one
-- due at infinity is dead-lettered with the reason (`worker outbox dead requeue` makes it due
-- now, if that is what its producer meant). The table is locked against writers first, so no
-- producer can add such a row between the clean-up and the constraint.
LOCK TABLE task_outbox IN SHARE ROW EXCLUSIVE MODE;

UPDATE task_outbox SET run_at = now() WHERE run_at = '-infinity';

WITH moved AS (
    DELETE FROM task_outbox WHERE run_at = 'infinity'
    RETURNING id, task_id, job_id, queue, payload, run_at, attempts, created_at)
INSERT INTO task_outbox_dead
    (original_id, task_id, job_id, queue, payload, run_at, attempts, last_error, created_at)
SELECT id, task_id, job_id, queue, payload, run_at, attempts,
       'run_at is infinity: the task would never be due (dead-lettered by migration V6)', created_at
FROM moved;

ALTER TABLE task_outbox ADD CONSTRAINT task_outbox_run_at_finite CHECK (isfinite(run_at));

-- As in V2, plus the refusal of a non-finite run_at with an error that names it (the CHECK
-- above would refuse it too, but only by the constraint's name).
CREATE OR REPLACE FUNCTION enqueue_task(
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
    IF NOT isfinite(coalesce(p_run_at, now())) THEN
        RAISE EXCEPTION 'enqueue_task(%): run_at must be a finite time, not %', p_task_id, p_run_at
            USING ERRCODE = '22008', HINT = 'pass now() or NULL for a task that is due at once';
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
