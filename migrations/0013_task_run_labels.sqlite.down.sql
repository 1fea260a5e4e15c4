-- 0013: drop the task runs' labels
ALTER TABLE task_run DROP COLUMN labels;
