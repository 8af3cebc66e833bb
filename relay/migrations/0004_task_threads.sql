-- The Discord thread each task's output went to, kept as long as the task (thread marks last only while a
-- follower runs): a person's task history links each task's thread. Deleted with the task.
CREATE TABLE ct_task_threads (
    task text COLLATE "C" PRIMARY KEY REFERENCES ct_tasks (id) ON DELETE CASCADE,
    thread bigint NOT NULL
);
