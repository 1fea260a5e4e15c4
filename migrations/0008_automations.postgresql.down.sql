-- 0008: drop the automations, their related resources, trigger state and action queue
DROP TABLE automation_action_queue;
DROP TABLE automation_child_firing;
DROP TABLE automation_bucket;
DROP TABLE automation_related_resource;
DROP TABLE automation;
