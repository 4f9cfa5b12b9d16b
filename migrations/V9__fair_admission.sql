-- Fair admission of chats (issue 19): waiting time orders the queue, caps per owner and per org
-- hold across replicas, and operators override caps and weights per subject without a restart.
-- The claim that uses all of this is `src/chats/admission.rs`; docs/chats.md explains the model.

-- When the chat last became `pending`: what the claim orders by (FIFO within an owner), what
-- `chat list --status pending` and `chat queue` show as the wait, and the start of the
-- `chats.admission.wait` histogram. NULL exactly when the chat is not pending.
ALTER TABLE chats ADD COLUMN pending_since timestamptz;
-- The organisation a chat is billed to, set by the API tier; NULL = no org (no org cap applies).
ALTER TABLE chats ADD COLUMN org_id uuid;

-- Chats already pending have waited since their last change at best.
UPDATE chats SET pending_since = updated_at WHERE status = 'pending';

-- Every writer that makes a chat pending (post_chat_message, recovery, the release on shutdown,
-- the heartbeat handing back a chat, a runner whose turn ended with new user messages, the API
-- tier) goes through this trigger, so none can forget the clock and none can leave a stale one:
-- entering `pending` starts it (unless the writer gave a time, as tests and imports do), staying
-- `pending` keeps it, leaving `pending` clears it.
CREATE FUNCTION chats_track_pending_since() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'pending' THEN
        IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'pending' THEN
            NEW.pending_since := coalesce(NEW.pending_since, now());
        ELSE
            NEW.pending_since := coalesce(NEW.pending_since, OLD.pending_since, now());
        END IF;
    ELSE
        NEW.pending_since := NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER chats_pending_since
    BEFORE INSERT OR UPDATE OF status, pending_since ON chats
    FOR EACH ROW EXECUTE FUNCTION chats_track_pending_since();

ALTER TABLE chats ADD CONSTRAINT chats_pending_has_since
    CHECK ((status = 'pending') = (pending_since IS NOT NULL));

-- FIFO by waiting time: the oldest wait (metrics, `chat queue`), `chat list --status pending`.
DROP INDEX chats_pending_idx;
CREATE INDEX chats_pending_idx ON chats (pending_since, id) WHERE status = 'pending' AND NOT archived;
-- The claim: the distinct waiting owners (a skip scan, one probe per owner), then each owner's
-- oldest few. Its cost follows the number of waiting owners, never one owner's backlog.
CREATE INDEX chats_pending_owner_idx ON chats (owner_id, pending_since, id)
    WHERE status = 'pending' AND NOT archived;
-- Running chats per owner and per org: what a cap counts.
CREATE INDEX chats_running_owner_idx ON chats (owner_id) WHERE status = 'running';
CREATE INDEX chats_running_org_idx ON chats (org_id) WHERE status = 'running' AND org_id IS NOT NULL;

-- Operator overrides of the worker's default caps (`chats.max_running_per_owner`,
-- `chats.max_running_per_org`) and of the fair-share weight, per owner or per org. Read by every
-- claim, so a change applies at the next claim on every replica. Written by
-- `worker chat quota set|rm`.
CREATE TABLE chat_quotas (
    subject_kind text             NOT NULL CHECK (subject_kind IN ('owner', 'org')),
    subject_id   uuid             NOT NULL,
    -- Running chats at most; NULL = the worker's default cap for this kind, 0 = no cap (the same
    -- meaning 0 has in the config keys).
    max_running  integer          CHECK (max_running >= 0),
    -- Share of free capacity: an owner of weight 2 is served as if it ran half its chats. On an
    -- org row, multiplies the weight of that org's chats.
    weight       double precision NOT NULL DEFAULT 1 CHECK (weight > 0 AND weight <= 1000),
    updated_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_kind, subject_id)
);
