-- 0010: back to no index for the task-run dispatcher
DROP INDEX ix_task_run__scheduled_task_key;
