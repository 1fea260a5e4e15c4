-- 0006: back to a separate index on task_run.flow_run_id
CREATE INDEX ix_task_run__flow_run_id ON task_run (flow_run_id);
