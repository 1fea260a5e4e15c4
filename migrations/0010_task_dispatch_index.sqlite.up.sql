-- 0010: the task-run dispatcher's query (scheduled runs of the task keys that task workers subscribed to,
-- oldest first) searches this index per key; a partial index: only runs in a scheduled state are in it
-- (state_type is a column as well: without it SQLite's planner prefers the state_type index)
CREATE INDEX ix_task_run__scheduled_task_key ON task_run (state_type, task_key, expected_start_time)
    WHERE state_type = 'SCHEDULED';
