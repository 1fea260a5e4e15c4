-- 0004: what Prefect 3 clients need: events (with one row per involved resource), server configuration, concurrency leases

CREATE TABLE events (
    id VARCHAR(36) PRIMARY KEY,
    occurred VARCHAR(40) NOT NULL,
    received VARCHAR(40) NOT NULL,
    event VARCHAR(1024) NOT NULL,
    resource_id VARCHAR(1024) NOT NULL,
    resource TEXT NOT NULL DEFAULT '{}',
    related_resource_ids TEXT NOT NULL DEFAULT '[]',
    related TEXT NOT NULL DEFAULT '[]',
    payload TEXT NOT NULL DEFAULT '{}',
    follows VARCHAR(36)
);

CREATE TABLE event_resources (
    event_id VARCHAR(36) NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    occurred VARCHAR(40) NOT NULL,
    resource_id VARCHAR(1024) NOT NULL,
    resource_role VARCHAR(255) NOT NULL,
    resource TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (event_id, resource_id, resource_role)
);

CREATE TABLE configuration (
    key VARCHAR(255) PRIMARY KEY,
    value TEXT NOT NULL,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL
);

CREATE TABLE concurrency_lease (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    expiration VARCHAR(40) NOT NULL,
    limit_ids TEXT NOT NULL DEFAULT '[]',
    slots INTEGER NOT NULL,
    holder TEXT
);

CREATE INDEX ix_concurrency_lease__expiration ON concurrency_lease (expiration);
CREATE INDEX ix_events__occurred ON events (occurred);
CREATE INDEX ix_events__event_occurred ON events (event, occurred);
CREATE INDEX ix_events__resource_id_occurred ON events (resource_id, occurred);
CREATE INDEX ix_event_resources__resource_id_occurred ON event_resources (resource_id, occurred);
