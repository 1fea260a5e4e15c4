-- 0012: nothing to undo: the ids it cleared named work queues that no longer exist (a statement all the same,
-- as every script has one)
SELECT 1;
