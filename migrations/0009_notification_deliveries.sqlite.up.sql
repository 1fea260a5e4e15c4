-- 0009: every attempt to deliver a notification, kept per policy so an operator can see what was sent where,
-- and what failed and why (the queue forgets a notification once sent). Bounded: the newest 1,000 per policy.
CREATE TABLE flow_run_notification_delivery (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    flow_run_notification_policy_id VARCHAR(36) NOT NULL,
    flow_run_id VARCHAR(36),
    state_name VARCHAR(64),
    destination TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status VARCHAR(20) NOT NULL,
    error TEXT
);
CREATE INDEX ix_notification_delivery__policy_created ON flow_run_notification_delivery (flow_run_notification_policy_id, created);
