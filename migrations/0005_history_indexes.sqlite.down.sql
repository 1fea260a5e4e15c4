-- 0005: back to the single-column expected_start_time index
CREATE INDEX ix_flow_run__expected_start_time ON flow_run (expected_start_time);
DROP INDEX ix_flow_run__expected_start_time_history;
