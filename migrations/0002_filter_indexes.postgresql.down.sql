-- 0002: drop the filter indexes
DROP INDEX ix_flow_run__expected_start_time;
DROP INDEX ix_flow_run__state_type_expected_start_time;
DROP INDEX ix_flow_run__start_time;
DROP INDEX ix_flow_run__end_time;
DROP INDEX ix_flow_run__next_scheduled_start_time;
DROP INDEX ix_flow_run__name;
DROP INDEX ix_flow_run__work_queue_id;
DROP INDEX ix_task_run__expected_start_time;
DROP INDEX ix_task_run__state_type;
DROP INDEX ix_deployment__flow_id;
DROP INDEX ix_work_queue__work_pool_id_priority;
DROP INDEX IF EXISTS ix_flow_run__name_trgm;
