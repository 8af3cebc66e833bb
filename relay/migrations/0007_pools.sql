-- Worker pools (issue 17): the operator's pools, and which users' records say anything about pools (a mode,
-- an assignment to a worker), so counting a worker's users reads those rows rather than every user's. No
-- record written before this migration has a pool, so `in_pool` starts false for every existing row.
CREATE TABLE ct_pools (
    name text COLLATE "C" PRIMARY KEY,
    body bytea NOT NULL
);
ALTER TABLE ct_users ADD COLUMN in_pool boolean NOT NULL DEFAULT false;
CREATE INDEX ct_users_in_pool ON ct_users (id) WHERE in_pool;
