-- 0013: a task run's labels, as Prefect 3 keeps them: its flow run's labels, prefect.flow-run.id, then the
-- labels its client sent (see task_run_labels); the task runs made before have none
ALTER TABLE task_run ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
