-- 0003: a flow's or a deployment's runs found and ordered by one index; partial indexes where most rows are NULL
CREATE INDEX ix_flow_run__flow_id_expected_start_time ON flow_run (flow_id, expected_start_time);
CREATE INDEX ix_flow_run__deployment_id_expected_start_time ON flow_run (deployment_id, expected_start_time)
    WHERE deployment_id IS NOT NULL;
CREATE INDEX ix_flow_run__parent_task_run_id_not_null ON flow_run (parent_task_run_id)
    WHERE parent_task_run_id IS NOT NULL;
DROP INDEX ix_flow_run__flow_id;
DROP INDEX ix_flow_run__deployment_id;
DROP INDEX ix_flow_run__parent_task_run_id;
