-- The relay's records, as ct-relay's PostgreSQL store (relay/src/store/postgres/) reads and writes them.
--
-- Every record is kept whole in `body`: the same JSON bytes the embedded (sled) store keeps, so both backends
-- read alike and `ct-relay migrate` moves records without translating them. (To read one by hand:
-- convert_from(body, 'UTF8')::jsonb.) The other columns are copies of the record's fields that the relay's
-- queries select and sort by, written in the same statement as the body.
--
-- Numbers that are u64 in the relay (times in Unix seconds, orders, sequence numbers, byte counts) are bigint
-- here, capped at 9223372036854775807; nothing the relay counts gets near it.
--
-- Keys and the text columns sorted on are COLLATE "C": they compare as bytes, as the embedded store's keys do,
-- whatever the database's locale.

-- A paired agent, keyed by its key's fingerprint (32 bytes).
CREATE TABLE ct_agents (
    fingerprint bytea PRIMARY KEY,
    owner text COLLATE "C" NOT NULL,
    body bytea NOT NULL
);
-- Every task submission looks up its owner's agents.
CREATE INDEX ct_agents_by_owner ON ct_agents (owner);

-- One-time pairing codes.
CREATE TABLE ct_pair_codes (
    id text COLLATE "C" PRIMARY KEY,
    owner text COLLATE "C" NOT NULL,
    expires_at bigint NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX ct_pair_codes_by_owner ON ct_pair_codes (owner);
CREATE INDEX ct_pair_codes_by_expiry ON ct_pair_codes (expires_at);

-- Tasks. `is_open`: the task has not reached a final state. `ord`: its queue order (the record's `order`).
CREATE TABLE ct_tasks (
    id text COLLATE "C" PRIMARY KEY,
    agent bytea NOT NULL,
    requester text COLLATE "C" NOT NULL,
    session text COLLATE "C",
    is_open boolean NOT NULL,
    ord bigint NOT NULL,
    updated_at bigint NOT NULL,
    output_bytes bigint NOT NULL,
    body bytea NOT NULL
);
-- An agent's queue: its open tasks, oldest first.
CREATE INDEX ct_tasks_open_by_agent ON ct_tasks (agent, ord, id) WHERE is_open;
-- How many tasks one person has queued or running (a limit checked at every submission).
CREATE INDEX ct_tasks_open_by_requester ON ct_tasks (requester) WHERE is_open;
-- A person's tasks newest first, and the bytes of output they hold (summed from the index alone).
CREATE INDEX ct_tasks_by_requester ON ct_tasks (requester, ord, id) INCLUDE (output_bytes);
-- An agent's tasks newest first (its owner's task list).
CREATE INDEX ct_tasks_by_agent ON ct_tasks (agent, ord, id);
-- Resuming a Claude Code session.
CREATE INDEX ct_tasks_by_session ON ct_tasks (agent, session) WHERE session IS NOT NULL;
-- Retention: final tasks by the time they ended.
CREATE INDEX ct_tasks_ended ON ct_tasks (updated_at, id) WHERE NOT is_open;

-- Each task's events, by sequence number. An event the agent sends again after a reconnect has the same key
-- and is stored once (written with ON CONFLICT DO NOTHING). Deleted with their task, by the store.
CREATE TABLE ct_events (
    task text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (task, seq)
);

-- One owner's agents shared with one grantee.
CREATE TABLE ct_shares (
    owner text COLLATE "C" NOT NULL,
    grantee text COLLATE "C" NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (owner, grantee)
);
-- Who shares with a person: looked up by every submission that names an owner.
CREATE INDEX ct_shares_by_grantee ON ct_shares (grantee, owner);

-- Per-user settings.
CREATE TABLE ct_users (
    id text COLLATE "C" PRIMARY KEY,
    body bytea NOT NULL
);

-- The audit log. `seq` is handed out from ct_audit_counter in the transaction that writes the entry, so
-- numbers follow commit order without gaps (a missing number means a pruned entry).
CREATE TABLE ct_audit (
    seq bigint PRIMARY KEY,
    owner text COLLATE "C" NOT NULL,
    at bigint NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX ct_audit_by_owner ON ct_audit (owner, seq);

-- The last audit number handed out: one row, locked by each audited write until it commits.
CREATE TABLE ct_audit_counter (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last bigint NOT NULL
);
INSERT INTO ct_audit_counter (last) VALUES (0);

-- Where the Discord front end posts each task's output (its own JSON, kept as it is given).
CREATE TABLE ct_thread_marks (
    task text COLLATE "C" PRIMARY KEY,
    mark bytea NOT NULL
);

-- Queue and mint order (Store::next_order), increasing across restarts and across nodes.
CREATE SEQUENCE ct_order;
