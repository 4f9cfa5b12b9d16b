-- Chats (AI agent conversations) and their messages (SPEC §5, §7.1). The API tier creates chats
-- and posts user messages with post_chat_message(...); the chat loops claim pending chats, run one
-- agent turn each and write the agent's messages back, every write fenced by (worker_id,
-- generation). Status-like columns are text + CHECK, never Postgres enums (see V1).

CREATE TABLE chats (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The partition key on paper (chats by owner, SPEC §1).
    owner_id     uuid        NOT NULL,
    workspace_id uuid,
    title        text        NOT NULL DEFAULT '',
    status       text        NOT NULL DEFAULT 'waiting'
                 CHECK (status IN ('waiting', 'pending', 'running', 'paused', 'completed', 'error')),
    -- The owning worker while running. No foreign key to workers on purpose: worker rows unseen
    -- for a day are deleted while chats may still name them, and recovery treats a missing worker
    -- row as dead rather than having the delete cascade into (or be blocked by) chats.
    worker_id    uuid,
    -- The fencing token: +1 on every acquisition. A runner writes only while its (worker_id,
    -- generation) still match, so a runner whose chat was recovered and re-acquired elsewhere
    -- cannot write into the new turn.
    generation   bigint      NOT NULL DEFAULT 0 CHECK (generation >= 0),
    started_at   timestamptz,
    archived     boolean     NOT NULL DEFAULT false,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- Ownership and running are one fact: a running chat without an owner could never be
    -- recovered, and an owner on a chat that is not running would be interrupted by nobody.
    CONSTRAINT chats_running_has_worker CHECK ((status = 'running') = (worker_id IS NOT NULL))
);

-- Matches the acquire claim (WHERE status = 'pending' AND NOT archived ORDER BY created_at, id
-- FOR UPDATE SKIP LOCKED): an index range scan over pending chats only, oldest first.
CREATE INDEX chats_pending_idx ON chats (created_at, id) WHERE status = 'pending' AND NOT archived;
-- The heartbeat's ownership read (WHERE worker_id = me AND status = 'running') and recovery's
-- join to workers.
CREATE INDEX chats_running_worker_idx ON chats (worker_id) WHERE status = 'running';

CREATE TABLE chat_messages (
    id         bigserial   PRIMARY KEY,
    chat_id    uuid        NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    role       text        NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content    jsonb       NOT NULL,
    -- Who sees the message: the user (UI), the model (agent input), or both.
    visibility text        NOT NULL DEFAULT 'both' CHECK (visibility IN ('user', 'model', 'both')),
    deleted    boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Every reader goes by chat in id order: the agent's input, `chat tail --after N`.
CREATE INDEX chat_messages_chat_id_id_idx ON chat_messages (chat_id, id);

-- Liveness for readers: the heartbeat renews one lease row per worker (workers.last_seen_at),
-- not one row per chat, so a chat's heartbeat is its owner's lease. NULL when nobody owns the
-- chat, or when the owner's row is gone (recovery returns such chats to pending).
CREATE VIEW chat_liveness AS
SELECT c.id AS chat_id,
       c.status,
       c.worker_id,
       c.generation,
       w.last_seen_at AS heartbeat_at
FROM chats c
LEFT JOIN workers w ON w.id = c.worker_id;

-- Posts one message to a chat and returns its id. Runs in the caller's transaction, so the
-- message, its notifications and the status change commit (or roll back) together.
--
-- NOTIFY chat_<chat id> carries {"after_message_id": id - 1}, not the id itself: message ids come
-- from a sequence, so two writers can commit out of id order (id 8 visible before id 7). A
-- subscriber that has delivered up to N looks up messages with id > min(after_message_id, N) and
-- skips ids it already delivered, so a late-committing lower id is still found. The channel name
-- contains hyphens: LISTEN must quote it ("chat_<uuid>").
--
-- A user message on a `waiting` chat makes it `pending` and wakes the acquire loops (NOTIFY
-- chat_pending). Other statuses are left alone: a running chat's runner sees the message when
-- its turn ends; paused, completed and error chats are moved by the API tier, not by a message.
--
-- The chat row is locked first (FOR NO KEY UPDATE, the lock an UPDATE of a non-key column takes)
-- so that a runner ending its turn and this function are ordered: the runner locks the row, then
-- looks for user messages newer than its turn's input in a later statement; either it sees this
-- message (and sets pending itself), or this function runs after the runner committed `waiting`
-- and sets pending here. Without the lock both could miss each other and leave the message
-- unanswered.
CREATE FUNCTION post_chat_message(p_chat_id uuid, p_role text, p_content jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_id     bigint;
BEGIN
    SELECT status INTO v_status FROM chats WHERE id = p_chat_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'post_chat_message: chat % does not exist', p_chat_id
            USING ERRCODE = 'no_data_found';
    END IF;

    INSERT INTO chat_messages (chat_id, role, content)
    VALUES (p_chat_id, p_role, p_content)
    RETURNING id INTO v_id;
    PERFORM pg_notify('chat_' || p_chat_id::text,
                      json_build_object('after_message_id', v_id - 1)::text);

    IF p_role = 'user' AND v_status = 'waiting' THEN
        UPDATE chats SET status = 'pending', updated_at = now() WHERE id = p_chat_id;
        PERFORM pg_notify('chat_pending', p_chat_id::text);
    END IF;
    RETURN v_id;
END;
$$;
