-- 0011: a flow run's work_pool_id and work_pool_name (columns of 0001, never set until now) are its work
-- queue's pool, as Prefect's FlowRunResponse answers them: filled here for the runs made before
UPDATE flow_run SET
    work_pool_id = (SELECT wq.work_pool_id FROM work_queue wq WHERE wq.id = flow_run.work_queue_id),
    work_pool_name = (
        SELECT wp.name FROM work_queue wq JOIN work_pool wp ON wp.id = wq.work_pool_id
        WHERE wq.id = flow_run.work_queue_id
    )
WHERE work_queue_id IS NOT NULL;
