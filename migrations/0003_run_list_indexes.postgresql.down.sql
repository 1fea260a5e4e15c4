-- 0003: back to the single-column indexes
CREATE INDEX ix_flow_run__flow_id ON flow_run (flow_id);
CREATE INDEX ix_flow_run__deployment_id ON flow_run (deployment_id);
CREATE INDEX ix_flow_run__parent_task_run_id ON flow_run (parent_task_run_id);
DROP INDEX ix_flow_run__flow_id_expected_start_time;
DROP INDEX ix_flow_run__deployment_id_expected_start_time;
DROP INDEX ix_flow_run__parent_task_run_id_not_null;
