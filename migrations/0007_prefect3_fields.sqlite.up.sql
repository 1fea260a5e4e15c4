-- 0007: fields Prefect 3 clients send and read back: a deployment schedule's slug and parameter overrides
-- (merged over the deployment's parameters in the runs it makes), a deployment's global concurrency limit
-- (Prefect 3 keeps a deployment's limit as the global limit `deployment:{id}`) and its concurrency options,
-- a work pool's storage configuration
ALTER TABLE deployment_schedule ADD COLUMN parameters TEXT NOT NULL DEFAULT '{}';
ALTER TABLE deployment_schedule ADD COLUMN slug VARCHAR(255);
ALTER TABLE deployment ADD COLUMN concurrency_options TEXT;
ALTER TABLE deployment ADD COLUMN concurrency_limit_id VARCHAR(36);
ALTER TABLE work_pool ADD COLUMN storage_configuration TEXT NOT NULL DEFAULT '{}';
-- a slug names one schedule of its deployment (NULLs, the schedules without one, never collide)
CREATE UNIQUE INDEX ix_deployment_schedule__deployment_id__slug ON deployment_schedule (deployment_id, slug);
