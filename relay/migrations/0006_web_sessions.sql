-- The dashboard's one-time sign-in links and browser sessions, shared by every node so a browser signed in
-- through one node is signed in on all, and signing out on one ends the session everywhere. Keyed by the
-- SHA-256 (hex) of the secret: the secret itself is never stored. `ends_at` is when the record stops being
-- valid (its absolute expiry, or earlier by idle time), kept beside the JSON so queries and pruning filter on
-- it; it moves with `last_seen`.
CREATE TABLE ct_web_sessions (
    hash text COLLATE "C" PRIMARY KEY,
    kind text COLLATE "C" NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    public_id text COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    ends_at bigint NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX ct_web_sessions_by_user ON ct_web_sessions (user_id, public_id);
CREATE INDEX ct_web_sessions_by_end ON ct_web_sessions (ends_at);
