-- Foundation schema: worker leases and operator loop controls.
-- Status-like columns are text + CHECK, never Postgres enums: a non-built-in type on the wire
-- makes tokio-postgres look it up with a named statement, which breaks behind pgbouncer.

CREATE TABLE workers (
    id           uuid        PRIMARY KEY,
    hostname     text        NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    -- The lease: every loop that judges liveness compares this with the database clock.
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX workers_last_seen_at_idx ON workers (last_seen_at);

-- Read by every loop at each tick on every replica: pausing is a row update, not a restart.
CREATE TABLE loop_controls (
    loop_name  text        PRIMARY KEY,
    paused     boolean     NOT NULL DEFAULT false,
    reason     text,
    updated_by text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
