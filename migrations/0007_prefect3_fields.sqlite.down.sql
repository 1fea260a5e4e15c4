-- 0007: drop the schedule slug and parameters, the deployment's limit and concurrency options, the pool's storage
DROP INDEX ix_deployment_schedule__deployment_id__slug;
ALTER TABLE work_pool DROP COLUMN storage_configuration;
ALTER TABLE deployment DROP COLUMN concurrency_limit_id;
ALTER TABLE deployment DROP COLUMN concurrency_options;
ALTER TABLE deployment_schedule DROP COLUMN slug;
ALTER TABLE deployment_schedule DROP COLUMN parameters;
