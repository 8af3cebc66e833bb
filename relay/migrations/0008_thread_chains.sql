-- Discord threads in a cluster (issue 15): every node answers a thread's commands, so what a thread's chain of
-- tasks is at (its current task, the `/cc` settings for the next follow-up) and the answers given so far to an
-- AskUserQuestion are kept here, not in one node's memory. Both hold the bot's own JSON and go with the task.
CREATE TABLE ct_thread_chains (
    thread bigint PRIMARY KEY,
    task text COLLATE "C" NOT NULL REFERENCES ct_tasks (id) ON DELETE CASCADE,
    body bytea NOT NULL
);
-- For the cascade when a task is deleted.
CREATE INDEX ct_thread_chains_task ON ct_thread_chains (task);
CREATE TABLE ct_approval_answers (
    task text COLLATE "C" NOT NULL REFERENCES ct_tasks (id) ON DELETE CASCADE,
    approval text COLLATE "C" NOT NULL,
    -- Question index (as text) → answer: merged with `||` in one upsert, so concurrent answers all land.
    answers jsonb NOT NULL,
    PRIMARY KEY (task, approval)
);
