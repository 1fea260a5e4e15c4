-- 0009: back to no delivery history
DROP TABLE flow_run_notification_delivery;
