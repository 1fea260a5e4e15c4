-- 0011: back to runs whose work_pool_id and work_pool_name are never set
UPDATE flow_run SET work_pool_id = NULL, work_pool_name = NULL;
