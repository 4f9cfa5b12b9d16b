-- Gitsync (SPEC §5, §7.2): the pull-request status of each chat's branch, and the OAuth links
-- whose tokens the refresher sends to the git provider. The API tier calls
-- mark_diff_stale(chat_id, origin, branch) when a chat's branch may have changed; the gitsync
-- loop leases due rows (stale_at <= now()), asks the provider and writes the status back.
-- Status-like columns are text + CHECK, never Postgres enums (see V1).

CREATE TABLE chat_diff_statuses (
    chat_id            uuid        PRIMARY KEY REFERENCES chats (id) ON DELETE CASCADE,
    git_remote_origin  text        NOT NULL DEFAULT '',
    git_branch         text        NOT NULL DEFAULT '',
    -- The pull request (all NULL while none is known).
    url                text,
    pr_number          bigint,
    pull_request_state text        CHECK (pull_request_state IN ('open', 'closed', 'merged')),
    title              text,
    draft              boolean,
    additions          bigint,
    deletions          bigint,
    changed_files      bigint,
    commits            bigint,
    approved           boolean,
    changes_requested  boolean,
    reviewer_count     bigint,
    checks_state       text        CHECK (checks_state IN ('success', 'failure', 'pending', 'none')),
    author_login       text,
    base_branch        text,
    head_branch        text,
    head_sha           text,
    -- Why the last refresh failed (names the URL or the thing at fault); NULL after a success.
    last_error         text,
    -- What the last refresh came to, for `worker gitsync stats`; NULL until the first refresh.
    last_outcome       text        CHECK (last_outcome IN
                                   ('ok', 'not_modified', 'no_pr', 'no_token', 'rate_limited', 'error')),
    refreshed_at       timestamptz,
    -- When the row is due. A refresher's lease moves it lease-length ahead; the write-back sets
    -- the next refresh time. The write-back only touches a row whose stale_at is still the value
    -- its lease set, so a mark_diff_stale meanwhile (stale_at = now()) wins over a stale answer.
    stale_at           timestamptz NOT NULL DEFAULT now(),
    -- Set by a lease, cleared by the write-back and by mark_diff_stale: tells a leased row from
    -- one that is backing off (both have stale_at in the future). Only read by stats.
    leased_at          timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    -- When the row was last MARKED (mark_diff_stale, `worker gitsync refresh`), not when it was
    -- last refreshed: the no-PR backoff is short only while a mark is recent.
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- The lease scans due rows oldest first (WHERE stale_at <= now() ORDER BY stale_at LIMIT n).
CREATE INDEX chat_diff_statuses_stale_at_idx ON chat_diff_statuses (stale_at);

CREATE TABLE external_auth_links (
    user_id       uuid        NOT NULL,
    -- `[[gitsync.providers]].id`: tokens are only sent to that provider's API.
    provider_id   text        NOT NULL CHECK (provider_id <> ''),
    access_token  text        NOT NULL,
    refresh_token text,
    expires_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, provider_id)
);

-- Marks a chat's diff status due now, creating the row if needed. A changed origin or branch
-- clears what was known about the old one (PR fields, error, outcome), so no stale PR is shown
-- for a new branch. Runs in the caller's transaction.
CREATE FUNCTION mark_diff_stale(p_chat_id uuid, p_origin text, p_branch text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE chat_diff_statuses
    SET url = NULL, pr_number = NULL, pull_request_state = NULL, title = NULL, draft = NULL,
        additions = NULL, deletions = NULL, changed_files = NULL, commits = NULL, approved = NULL,
        changes_requested = NULL, reviewer_count = NULL, checks_state = NULL, author_login = NULL,
        base_branch = NULL, head_branch = NULL, head_sha = NULL, last_error = NULL,
        last_outcome = NULL, refreshed_at = NULL
    WHERE chat_id = p_chat_id
      AND (git_remote_origin, git_branch) IS DISTINCT FROM (coalesce(p_origin, ''), coalesce(p_branch, ''));
    INSERT INTO chat_diff_statuses (chat_id, git_remote_origin, git_branch, stale_at, updated_at)
    VALUES (p_chat_id, coalesce(p_origin, ''), coalesce(p_branch, ''), now(), now())
    ON CONFLICT (chat_id) DO UPDATE SET
        git_remote_origin = EXCLUDED.git_remote_origin,
        git_branch        = EXCLUDED.git_branch,
        stale_at          = now(),
        leased_at         = NULL,
        updated_at        = now();
END
$$;
