-- Prebuilds: templates and their versions, presets (how many prebuilt workspaces each version
-- should keep ready, optionally by cron schedule), workspaces, their builds and the provisioner
-- jobs that carry those builds out. The API tier owns these rows; the prebuilds reconciler reads
-- them in one snapshot per cycle (SPEC §7.5) and writes only new workspaces, builds and jobs (and
-- cancels pending jobs). The indexes below are the ones that snapshot needs.
-- Status-like columns are text + CHECK, never Postgres enums (see V1).

CREATE TABLE templates (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name              text        NOT NULL CHECK (name <> ''),
    -- The version new workspaces (and prebuilds) are built from; NULL until one is activated.
    -- Its foreign key is added below, once template_versions exists.
    active_version_id uuid,
    -- Soft flags: a deleted or deprecated template keeps no prebuilds, and the reconciler deletes
    -- the ones it still has.
    deleted           boolean     NOT NULL DEFAULT false,
    deprecated        boolean     NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE template_versions (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    template_id uuid        NOT NULL REFERENCES templates (id),
    name        text        NOT NULL CHECK (name <> ''),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX template_versions_template_id_idx ON template_versions (template_id);

ALTER TABLE templates
    ADD CONSTRAINT templates_active_version_id_fkey
    FOREIGN KEY (active_version_id) REFERENCES template_versions (id);

CREATE TABLE presets (
    id                    uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    template_version_id   uuid        NOT NULL REFERENCES template_versions (id),
    name                  text        NOT NULL CHECK (name <> ''),
    -- Prebuilds to keep ready when no schedule matches (0 = this preset has no prebuilds).
    desired_instances     integer     NOT NULL DEFAULT 0 CHECK (desired_instances >= 0),
    -- TTL: a prebuild older than this is deleted and replaced, so a long-idle prebuild does not
    -- hand out stale state. NULL = prebuilds never expire.
    invalidate_after_secs integer     CHECK (invalidate_after_secs IS NULL OR invalidate_after_secs > 0),
    -- IANA zone the schedules' cron expressions are read in. Not checked here: Postgres and the
    -- daemon's zone database may disagree on names; the daemon falls back to desired_instances
    -- and logs the preset when it cannot resolve the zone.
    scheduling_timezone   text        NOT NULL DEFAULT 'UTC' CHECK (scheduling_timezone <> ''),
    -- hard_limited: its prebuilds failed too often; validation_failed: its parameters do not
    -- validate, so every build would fail. The reconciler creates no prebuilds for either.
    prebuild_status       text        NOT NULL DEFAULT 'healthy'
                          CHECK (prebuild_status IN ('healthy', 'hard_limited', 'validation_failed')),
    created_at            timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX presets_template_version_id_idx ON presets (template_version_id);

-- While now, read in the preset's timezone, matches cron_expression (5 fields, minute
-- granularity), this desired_instances replaces the preset's. Overlapping matches are a
-- misconfiguration: the daemon then falls back to the preset's own count and logs it.
CREATE TABLE preset_schedules (
    id                uuid    PRIMARY KEY DEFAULT gen_random_uuid(),
    preset_id         uuid    NOT NULL REFERENCES presets (id) ON DELETE CASCADE,
    cron_expression   text    NOT NULL CHECK (cron_expression <> ''),
    desired_instances integer NOT NULL CHECK (desired_instances >= 0)
);

CREATE INDEX preset_schedules_preset_id_idx ON preset_schedules (preset_id);

CREATE TABLE provisioner_jobs (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    status       text        NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'canceled')),
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    completed_at timestamptz,
    -- The failure backoff counts failures by completed_at: a finished job must say when.
    CHECK (status IN ('pending', 'running') OR completed_at IS NOT NULL)
);

-- In-progress builds per preset and pending jobs to cancel: only active jobs, a small set.
CREATE INDEX provisioner_jobs_active_idx ON provisioner_jobs (status) WHERE status IN ('pending', 'running');
-- Recent failures per preset (the backoff window).
CREATE INDEX provisioner_jobs_failed_completed_at_idx ON provisioner_jobs (completed_at) WHERE status = 'failed';

CREATE TABLE workspaces (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- A prebuild is owned by the prebuilds system user until a user claims it (the owner changes,
    -- preset_id stays).
    owner_id    uuid        NOT NULL,
    template_id uuid        NOT NULL REFERENCES templates (id),
    preset_id   uuid        REFERENCES presets (id),
    name        text        NOT NULL CHECK (name <> ''),
    deleted     boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Last time someone used the workspace (the chat heartbeat bumps it); NULL = never used.
    -- The prebuilds reconciler does not read it.
    last_used_at timestamptz
);

-- The snapshot's running prebuilds: live workspaces of the system user, per preset. Led by
-- owner_id because most preset workspaces in a busy deployment are claimed ones, which the
-- snapshot must not scan.
CREATE INDEX workspaces_prebuilds_idx ON workspaces (owner_id, preset_id)
    WHERE NOT deleted AND preset_id IS NOT NULL;

CREATE TABLE workspace_builds (
    id                  uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id        uuid        NOT NULL REFERENCES workspaces (id),
    template_version_id uuid        NOT NULL REFERENCES template_versions (id),
    preset_id           uuid        REFERENCES presets (id),
    transition          text        NOT NULL CHECK (transition IN ('start', 'stop', 'delete')),
    -- 1, 2, … per workspace; the highest is the workspace's current state.
    build_number        integer     NOT NULL CHECK (build_number > 0),
    -- One job per build: UNIQUE also indexes the job → build join of in-progress and failed jobs.
    job_id              uuid        NOT NULL UNIQUE REFERENCES provisioner_jobs (id),
    initiator_id        uuid        NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- Its index also serves "latest build per workspace" (ORDER BY workspace_id, build_number
    -- DESC), scanned backwards: a separate DESC index would be a duplicate.
    UNIQUE (workspace_id, build_number)
);

-- Activating a template version (or clearing it) changes which presets are active: wake the
-- prebuilds reconciler at once instead of at its next interval. The payload is the template id.
CREATE FUNCTION notify_template_version_activated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('template_version_activated', NEW.id::text);
    RETURN NEW;
END;
$$;

CREATE TRIGGER templates_active_version_changed
    AFTER UPDATE OF active_version_id ON templates
    FOR EACH ROW
    WHEN (OLD.active_version_id IS DISTINCT FROM NEW.active_version_id)
    EXECUTE FUNCTION notify_template_version_activated();
