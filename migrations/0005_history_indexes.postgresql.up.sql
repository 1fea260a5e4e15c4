-- 0005: the flow-run history chart read from its index alone (an index-only scan: the other columns are INCLUDEd)
CREATE INDEX ix_flow_run__expected_start_time_history ON flow_run (expected_start_time)
    INCLUDE (state_type, state_name, total_run_time, start_time, state_timestamp);
DROP INDEX ix_flow_run__expected_start_time;
