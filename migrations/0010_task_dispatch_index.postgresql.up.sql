-- 0010: the task-run dispatcher's query (scheduled runs of the task keys that task workers subscribed to,
-- oldest first) searches this index per key; a partial index: only runs in a scheduled state are in it (not a
-- column of it: PostgreSQL drops the state_type condition that the index's WHERE implies, so a leading
-- state_type column would be left unconstrained and the whole index read)
CREATE INDEX ix_task_run__scheduled_task_key ON task_run (task_key, expected_start_time)
    WHERE state_type = 'SCHEDULED';
