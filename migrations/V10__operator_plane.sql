-- The operator plane (issue 20): an audit trail of operator actions, what the retention loop
-- removed, and preset invalidation.

-- One row per state-changing CLI command (`loop pause|resume`, `outbox dead requeue|purge`,
-- `gitsync refresh|put-token|encrypt-tokens`, `prebuilds invalidate`, `chat create|send`,
-- `chat quota set|rm`), written in the same transaction as the command's effect, so a row says
-- exactly what happened: an effect without its row, or a row without its effect, cannot commit.
-- A command that fails rolls its effect back and then records the failure (outcome `error`) in a
-- transaction of its own. Read with `worker audit list`.
CREATE TABLE operator_actions (
    id            bigserial   PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    -- `--actor`, else `$USER@hostname` of the machine the command ran on.
    actor         text        NOT NULL CHECK (actor <> ''),
    -- The subcommand path, e.g. `loop pause`, `outbox dead requeue`.
    command       text        NOT NULL CHECK (command <> ''),
    -- The command's arguments as given, secrets redacted (tokens never appear; URLs lose their
    -- passwords).
    arguments     jsonb       NOT NULL DEFAULT '{}',
    -- Rows the effect changed (NULL when the command changes no countable rows).
    rows_affected bigint      CHECK (rows_affected >= 0),
    outcome       text        NOT NULL CHECK (outcome IN ('ok', 'error')),
    -- The error the command failed with (outcome `error`), redacted like the arguments.
    error         text,
    CHECK ((outcome = 'error') = (error IS NOT NULL))
);

-- `audit list --since 1d`, newest first; retention deletes the oldest.
CREATE INDEX operator_actions_at_idx ON operator_actions (at);

-- What the `retention` loop last removed, per table (`task_outbox_dead` after
-- `outbox.dead_retention`, `operator_actions` after `audit.retention`): one row per table, upserted
-- by each tick, shown by `worker status`.
CREATE TABLE retention_runs (
    table_name    text        PRIMARY KEY CHECK (table_name IN ('task_outbox_dead', 'operator_actions')),
    ran_at        timestamptz NOT NULL,
    last_removed  bigint      NOT NULL CHECK (last_removed >= 0),
    total_removed bigint      NOT NULL CHECK (total_removed >= 0)
);

-- Dead letters are deleted oldest first by `dead_lettered_at` (V2's index covers it).

-- `worker prebuilds invalidate PRESET`: prebuilds created before this instant count as expired
-- and are replaced by the next reconciler cycle (the rule upstream coder uses). NULL = never
-- invalidated. A claimed workspace is no longer a prebuild and is never touched.
ALTER TABLE presets ADD COLUMN last_invalidated_at timestamptz;
