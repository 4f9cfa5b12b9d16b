-- GitHub tokens at rest (issue 16): external_auth_links.access_token and refresh_token may hold
-- AES-256-GCM ciphertext under one of the keys of `gitsync.token_keys`, named by a key id column
-- beside each. NULL key id = the column holds plaintext (rows written before encryption, or by a
-- deployment without keys). The format (src/gitsync/tokens.rs, README "GitHub tokens at rest"):
-- base64(nonce 12 bytes || ciphertext || tag 16 bytes), AAD
-- `external_auth_links.<column>:<user_id>:<provider_id>`, key id = first 7 hex digits of
-- sha256(key). `worker gitsync put-token` writes encrypted rows; `worker gitsync encrypt-tokens`
-- encrypts plaintext rows and re-encrypts rows under a key other than the first.
-- Adding NULL columns rewrites nothing; the checks hold for every existing row (all NULL).

ALTER TABLE external_auth_links
    ADD COLUMN access_token_key_id  text CHECK (access_token_key_id ~ '^[0-9a-f]{7}$'),
    ADD COLUMN refresh_token_key_id text CHECK (refresh_token_key_id ~ '^[0-9a-f]{7}$'),
    ADD CONSTRAINT external_auth_links_refresh_token_key_id_has_token
        CHECK (refresh_token_key_id IS NULL OR refresh_token IS NOT NULL);

COMMENT ON COLUMN external_auth_links.access_token_key_id IS
    'Key id (first 7 hex digits of sha256(key)) access_token is encrypted under; NULL = plaintext. '
    'Ciphertext: base64(nonce(12) || AES-256-GCM ciphertext || tag(16)), '
    'AAD external_auth_links.access_token:<user_id>:<provider_id>.';
COMMENT ON COLUMN external_auth_links.refresh_token_key_id IS
    'Key id refresh_token is encrypted under; NULL = plaintext (or no refresh token). '
    'AAD external_auth_links.refresh_token:<user_id>:<provider_id>.';
