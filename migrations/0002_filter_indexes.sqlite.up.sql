-- 0002: indexes that serve every filter and sort the UI and the SDK use
CREATE INDEX ix_flow_run__expected_start_time ON flow_run (expected_start_time);
CREATE INDEX ix_flow_run__state_type_expected_start_time ON flow_run (state_type, expected_start_time);
CREATE INDEX ix_flow_run__start_time ON flow_run (start_time);
CREATE INDEX ix_flow_run__end_time ON flow_run (end_time);
CREATE INDEX ix_flow_run__next_scheduled_start_time ON flow_run (next_scheduled_start_time);
CREATE INDEX ix_flow_run__name ON flow_run (name);
CREATE INDEX ix_flow_run__work_queue_id ON flow_run (work_queue_id);
CREATE INDEX ix_task_run__expected_start_time ON task_run (expected_start_time);
CREATE INDEX ix_task_run__state_type ON task_run (state_type);
CREATE INDEX ix_deployment__flow_id ON deployment (flow_id);
CREATE INDEX ix_work_queue__work_pool_id_priority ON work_queue (work_pool_id, priority);
