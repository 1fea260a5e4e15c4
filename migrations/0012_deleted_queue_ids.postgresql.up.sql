-- 0012: runs and deployments whose work queue was deleted no longer name it: their work_queue_id becomes null,
-- as Prefect's foreign keys (ON DELETE SET NULL) leave them; work_queue_name stays
UPDATE flow_run SET work_queue_id = NULL
WHERE work_queue_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM work_queue wq WHERE wq.id = flow_run.work_queue_id);
UPDATE deployment SET work_queue_id = NULL
WHERE work_queue_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM work_queue wq WHERE wq.id = deployment.work_queue_id);
