-- Files attached to a task, kept from its submission until the agent was sent them (or the task is deleted by
-- retention). One row per file, in the order attached. Not a foreign key to ct_tasks: a task and its files are
-- written by separate statements (the files first), and the relay deletes both.
CREATE TABLE ct_task_files (
    task text COLLATE "C" NOT NULL,
    idx integer NOT NULL,
    name text NOT NULL,
    media_type text,
    data bytea NOT NULL,
    PRIMARY KEY (task, idx)
);
