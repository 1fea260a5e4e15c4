-- 0006: task runs of a flow run are found by the unique (flow_run_id, task_key, dynamic_key) index, whose
-- prefix this one repeated; one index fewer to write for every task run created (one WAL page a commit)
DROP INDEX ix_task_run__flow_run_id;
