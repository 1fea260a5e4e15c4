-- 0008: automations (Prefect's events-in, actions-out rules): the automations themselves, the resources they
-- relate to (a deployment owns the automations made from its triggers), each trigger's durable counting
-- state (one bucket per automation, trigger and for_each key), and the queue of actions a firing owes.
CREATE TABLE automation (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(5000) NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    tags TEXT NOT NULL DEFAULT '[]',
    trigger TEXT NOT NULL,
    actions TEXT NOT NULL DEFAULT '[]',
    actions_on_trigger TEXT NOT NULL DEFAULT '[]',
    actions_on_resolve TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX ix_automation__name ON automation (name);

CREATE TABLE automation_related_resource (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    automation_id VARCHAR(36) NOT NULL REFERENCES automation (id) ON DELETE CASCADE,
    resource_id VARCHAR(1000) NOT NULL,
    automation_owned_by_resource BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (automation_id, resource_id)
);
CREATE INDEX ix_automation_related_resource__resource_id ON automation_related_resource (resource_id);

-- A trigger's window for one for_each key: counted events, the last one, and whether it fired (so a
-- restart, or another replica, carries on where the window stands).
CREATE TABLE automation_bucket (
    automation_id VARCHAR(36) NOT NULL REFERENCES automation (id) ON DELETE CASCADE,
    trigger_id VARCHAR(36) NOT NULL,
    bucketing_key TEXT NOT NULL,
    posture VARCHAR(20) NOT NULL,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    start_time VARCHAR(40) NOT NULL,
    end_time VARCHAR(40) NOT NULL,
    count INTEGER NOT NULL DEFAULT 0,
    last_event TEXT,
    triggering_labels TEXT NOT NULL DEFAULT '{}',
    triggered_at VARCHAR(40),
    PRIMARY KEY (automation_id, trigger_id, bucketing_key)
);
CREATE INDEX ix_automation_bucket__posture__end_time ON automation_bucket (posture, end_time);

-- Firings of a compound or sequence trigger's children, kept until the parent fires or its window ends.
CREATE TABLE automation_child_firing (
    automation_id VARCHAR(36) NOT NULL REFERENCES automation (id) ON DELETE CASCADE,
    parent_trigger_id VARCHAR(36) NOT NULL,
    child_trigger_id VARCHAR(36) NOT NULL,
    triggered VARCHAR(40) NOT NULL,
    firing TEXT NOT NULL,
    PRIMARY KEY (automation_id, parent_trigger_id, child_trigger_id)
);

-- One row per action a firing owes; a replica claims a row before acting, so each action runs once.
CREATE TABLE automation_action_queue (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    automation_id VARCHAR(36) NOT NULL,
    firing_id VARCHAR(80) NOT NULL,
    action_index INTEGER NOT NULL,
    action TEXT NOT NULL,
    context TEXT NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'PENDING',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at VARCHAR(40) NOT NULL,
    last_error TEXT,
    UNIQUE (firing_id, action_index)
);
CREATE INDEX ix_automation_action_queue__status__next_attempt_at ON automation_action_queue (status, next_attempt_at);
CREATE INDEX ix_automation_action_queue__automation_id ON automation_action_queue (automation_id, created);
