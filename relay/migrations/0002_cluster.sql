-- What the nodes of a cluster share besides the relay's records: who holds each agent's session, each node's
-- heartbeat, leases (the Discord gateway), rate-limit buckets that hold across nodes, and secrets every node
-- uses (the relay key agents pin). A relay of one uses them too.

-- Which node holds each agent's live session, and that session's epoch (from ct_epoch: greater than every
-- epoch before, so the newest session wins everywhere). A row is removed by its own session only.
CREATE TABLE ct_presence (
    agent bytea PRIMARY KEY,
    node text COLLATE "C" NOT NULL,
    epoch bigint NOT NULL,
    since bigint NOT NULL
);
CREATE SEQUENCE ct_epoch;

-- Each node's last heartbeat (its JSON record).
CREATE TABLE ct_nodes (
    id text COLLATE "C" PRIMARY KEY,
    body bytea NOT NULL
);

-- Leases, expiring by the database's clock so nodes' clocks need not agree.
CREATE TABLE ct_leases (
    name text COLLATE "C" PRIMARY KEY,
    holder text COLLATE "C" NOT NULL,
    until timestamptz NOT NULL
);

-- Token buckets shared by every node (tasks per person, pairing attempts per address).
CREATE TABLE ct_buckets (
    name text COLLATE "C" PRIMARY KEY,
    tokens double precision NOT NULL,
    at timestamptz NOT NULL
);
CREATE INDEX ct_buckets_by_use ON ct_buckets (at);

-- Secrets every node uses; the first node to start decides each.
CREATE TABLE ct_secrets (
    name text COLLATE "C" PRIMARY KEY,
    value bytea NOT NULL
);
