-- 0001: the tables of the Prefect 2 server: runs, states, logs, deployments, work pools, blocks, variables, artifacts, limits, notifications, saved searches

CREATE TABLE flow (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL UNIQUE,
    tags TEXT NOT NULL DEFAULT '[]',
    labels TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE flow_run (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    flow_id VARCHAR(36) NOT NULL REFERENCES flow (id) ON DELETE CASCADE,
    deployment_id VARCHAR(36),
    deployment_version VARCHAR(255),
    work_queue_id VARCHAR(36),
    work_queue_name VARCHAR(255),
    work_pool_id VARCHAR(36),
    work_pool_name VARCHAR(255),
    flow_version VARCHAR(255),
    parameters TEXT NOT NULL DEFAULT '{}',
    idempotency_key VARCHAR(255),
    context TEXT NOT NULL DEFAULT '{}',
    empirical_policy TEXT NOT NULL DEFAULT '{}',
    tags TEXT NOT NULL DEFAULT '[]',
    labels TEXT NOT NULL DEFAULT '{}',
    parent_task_run_id VARCHAR(36),
    state_id VARCHAR(36),
    state_type VARCHAR(20),
    state_name VARCHAR(255),
    state_timestamp VARCHAR(40),
    state TEXT,
    run_count INTEGER NOT NULL DEFAULT 0,
    expected_start_time VARCHAR(40),
    next_scheduled_start_time VARCHAR(40),
    start_time VARCHAR(40),
    end_time VARCHAR(40),
    total_run_time DOUBLE PRECISION NOT NULL DEFAULT 0,
    auto_scheduled BOOLEAN NOT NULL DEFAULT FALSE,
    infrastructure_document_id VARCHAR(36),
    infrastructure_pid VARCHAR(255),
    created_by TEXT,
    job_variables TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE flow_run_state (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    flow_run_id VARCHAR(36) NOT NULL REFERENCES flow_run (id) ON DELETE CASCADE,
    type VARCHAR(20) NOT NULL,
    name VARCHAR(255) NOT NULL,
    timestamp VARCHAR(40) NOT NULL,
    message TEXT,
    data TEXT,
    state_details TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE task_run (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    flow_run_id VARCHAR(36) REFERENCES flow_run (id) ON DELETE CASCADE,
    task_key VARCHAR(255) NOT NULL,
    dynamic_key VARCHAR(255) NOT NULL,
    cache_key VARCHAR(2000),
    cache_expiration VARCHAR(40),
    task_version VARCHAR(255),
    empirical_policy TEXT NOT NULL DEFAULT '{}',
    tags TEXT NOT NULL DEFAULT '[]',
    task_inputs TEXT NOT NULL DEFAULT '{}',
    state_id VARCHAR(36),
    state_type VARCHAR(20),
    state_name VARCHAR(255),
    state_timestamp VARCHAR(40),
    state TEXT,
    run_count INTEGER NOT NULL DEFAULT 0,
    flow_run_run_count INTEGER NOT NULL DEFAULT 0,
    expected_start_time VARCHAR(40),
    next_scheduled_start_time VARCHAR(40),
    start_time VARCHAR(40),
    end_time VARCHAR(40),
    total_run_time DOUBLE PRECISION NOT NULL DEFAULT 0
);

CREATE TABLE task_run_state (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    task_run_id VARCHAR(36) NOT NULL REFERENCES task_run (id) ON DELETE CASCADE,
    type VARCHAR(20) NOT NULL,
    name VARCHAR(255) NOT NULL,
    timestamp VARCHAR(40) NOT NULL,
    message TEXT,
    data TEXT,
    state_details TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE task_run_state_cache (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    cache_key VARCHAR(2000) NOT NULL,
    cache_expiration VARCHAR(40),
    task_run_state_id VARCHAR(36) NOT NULL
);

CREATE TABLE log (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    level INTEGER NOT NULL,
    message TEXT NOT NULL,
    timestamp VARCHAR(40) NOT NULL,
    flow_run_id VARCHAR(36),
    task_run_id VARCHAR(36)
);

CREATE TABLE deployment (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    flow_id VARCHAR(36) NOT NULL REFERENCES flow (id) ON DELETE CASCADE,
    version VARCHAR(255),
    description TEXT,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    is_schedule_active BOOLEAN NOT NULL DEFAULT TRUE,
    parameters TEXT NOT NULL DEFAULT '{}',
    tags TEXT NOT NULL DEFAULT '[]',
    labels TEXT NOT NULL DEFAULT '{}',
    work_queue_name VARCHAR(255),
    work_queue_id VARCHAR(36),
    path TEXT,
    entrypoint TEXT,
    manifest_path TEXT,
    storage_document_id VARCHAR(36),
    infrastructure_document_id VARCHAR(36),
    parameter_openapi_schema TEXT,
    pull_steps TEXT,
    enforce_parameter_schema BOOLEAN NOT NULL DEFAULT FALSE,
    job_variables TEXT NOT NULL DEFAULT '{}',
    infra_overrides TEXT NOT NULL DEFAULT '{}',
    created_by TEXT,
    updated_by TEXT,
    last_polled VARCHAR(40),
    status VARCHAR(20) NOT NULL DEFAULT 'NOT_READY',
    concurrency_limit INTEGER,
    UNIQUE (flow_id, name)
);

CREATE TABLE deployment_schedule (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    deployment_id VARCHAR(36) NOT NULL REFERENCES deployment (id) ON DELETE CASCADE,
    schedule TEXT NOT NULL,
    active BOOLEAN NOT NULL DEFAULT TRUE,
    max_active_runs INTEGER,
    max_scheduled_runs INTEGER,
    catchup BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE work_pool (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL UNIQUE,
    description TEXT,
    type VARCHAR(255) NOT NULL,
    base_job_template TEXT NOT NULL DEFAULT '{}',
    is_paused BOOLEAN NOT NULL DEFAULT FALSE,
    concurrency_limit INTEGER,
    default_queue_id VARCHAR(36),
    status VARCHAR(20) NOT NULL DEFAULT 'NOT_READY'
);

CREATE TABLE work_queue (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    is_paused BOOLEAN NOT NULL DEFAULT FALSE,
    concurrency_limit INTEGER,
    priority INTEGER NOT NULL DEFAULT 1,
    work_pool_id VARCHAR(36) NOT NULL REFERENCES work_pool (id) ON DELETE CASCADE,
    filter TEXT,
    last_polled VARCHAR(40),
    status VARCHAR(20) NOT NULL DEFAULT 'NOT_READY',
    UNIQUE (work_pool_id, name)
);

CREATE TABLE worker (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    work_pool_id VARCHAR(36) NOT NULL REFERENCES work_pool (id) ON DELETE CASCADE,
    last_heartbeat_time VARCHAR(40) NOT NULL,
    heartbeat_interval_seconds INTEGER,
    UNIQUE (work_pool_id, name)
);

CREATE TABLE block_type (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    slug VARCHAR(255) NOT NULL UNIQUE,
    logo_url TEXT,
    documentation_url TEXT,
    description TEXT,
    code_example TEXT,
    is_protected BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE block_schema (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    checksum VARCHAR(255) NOT NULL,
    fields TEXT NOT NULL DEFAULT '{}',
    block_type_id VARCHAR(36) NOT NULL REFERENCES block_type (id) ON DELETE CASCADE,
    capabilities TEXT NOT NULL DEFAULT '[]',
    version VARCHAR(255) NOT NULL DEFAULT 'non-versioned',
    UNIQUE (checksum, version)
);

CREATE TABLE block_schema_reference (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    parent_block_schema_id VARCHAR(36) NOT NULL REFERENCES block_schema (id) ON DELETE CASCADE,
    reference_block_schema_id VARCHAR(36) NOT NULL REFERENCES block_schema (id) ON DELETE CASCADE
);

CREATE TABLE block_document (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    data TEXT NOT NULL DEFAULT '{}',
    block_schema_id VARCHAR(36) NOT NULL REFERENCES block_schema (id) ON DELETE CASCADE,
    block_type_id VARCHAR(36) NOT NULL REFERENCES block_type (id) ON DELETE CASCADE,
    is_anonymous BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (block_type_id, name)
);

CREATE TABLE block_document_reference (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL,
    parent_block_document_id VARCHAR(36) NOT NULL REFERENCES block_document (id) ON DELETE CASCADE,
    reference_block_document_id VARCHAR(36) NOT NULL REFERENCES block_document (id) ON DELETE CASCADE
);

CREATE TABLE variable (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL UNIQUE,
    value TEXT,
    tags TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE artifact (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    key VARCHAR(255),
    type VARCHAR(255),
    description TEXT,
    data TEXT,
    metadata_ TEXT,
    flow_run_id VARCHAR(36),
    task_run_id VARCHAR(36)
);

CREATE TABLE artifact_collection (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    key VARCHAR(255) NOT NULL UNIQUE,
    latest_id VARCHAR(36) NOT NULL
);

CREATE TABLE concurrency_limit (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    tag VARCHAR(255) NOT NULL UNIQUE,
    concurrency_limit INTEGER NOT NULL,
    active_slots TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE concurrency_limit_v2 (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    active BOOLEAN NOT NULL DEFAULT TRUE,
    name VARCHAR(255) NOT NULL UNIQUE,
    "limit" INTEGER NOT NULL,
    active_slots INTEGER NOT NULL DEFAULT 0,
    denied_slots INTEGER NOT NULL DEFAULT 0,
    slot_decay_per_second DOUBLE PRECISION NOT NULL DEFAULT 0,
    avg_slot_occupancy_seconds DOUBLE PRECISION NOT NULL DEFAULT 2
);

CREATE TABLE flow_run_notification_policy (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    is_active BOOLEAN NOT NULL DEFAULT TRUE,
    state_names TEXT NOT NULL DEFAULT '[]',
    tags TEXT NOT NULL DEFAULT '[]',
    block_document_id VARCHAR(36) NOT NULL REFERENCES block_document (id) ON DELETE CASCADE,
    message_template TEXT
);

CREATE TABLE flow_run_notification_queue (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    flow_run_notification_policy_id VARCHAR(36) NOT NULL,
    flow_run_state_id VARCHAR(36) NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'PENDING',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at VARCHAR(40) NOT NULL,
    last_error TEXT
);

CREATE TABLE saved_search (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    name VARCHAR(255) NOT NULL UNIQUE,
    filters TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE flow_run_input (
    id VARCHAR(36) PRIMARY KEY,
    created VARCHAR(40) NOT NULL,
    updated VARCHAR(40) NOT NULL,
    flow_run_id VARCHAR(36) NOT NULL REFERENCES flow_run (id) ON DELETE CASCADE,
    key VARCHAR(255) NOT NULL,
    value TEXT NOT NULL,
    sender VARCHAR(255),
    UNIQUE (flow_run_id, key)
);

CREATE TABLE csrf_token (
    token VARCHAR(255) PRIMARY KEY,
    client VARCHAR(255) NOT NULL UNIQUE,
    expiration VARCHAR(40) NOT NULL
);

CREATE UNIQUE INDEX uq_flow_run__flow_id_idempotency_key ON flow_run (flow_id, idempotency_key);
CREATE UNIQUE INDEX uq_task_run__flow_run_id_task_key_dynamic_key ON task_run (flow_run_id, task_key, dynamic_key);
CREATE INDEX ix_flow_run_state__flow_run_id_timestamp ON flow_run_state (flow_run_id, timestamp);
CREATE INDEX ix_task_run_state__task_run_id_timestamp ON task_run_state (task_run_id, timestamp);
CREATE INDEX ix_task_run_state_cache__cache_key ON task_run_state_cache (cache_key, created);
CREATE INDEX ix_task_run__flow_run_id ON task_run (flow_run_id);
CREATE INDEX ix_log__flow_run_id_timestamp ON log (flow_run_id, timestamp);
CREATE INDEX ix_log__timestamp ON log (timestamp);
CREATE INDEX ix_flow_run__flow_id ON flow_run (flow_id);
CREATE INDEX ix_flow_run__parent_task_run_id ON flow_run (parent_task_run_id);
CREATE INDEX ix_flow_run__deployment_id ON flow_run (deployment_id);
CREATE INDEX ix_artifact__key_created ON artifact (key, created);
CREATE INDEX ix_artifact__flow_run_id ON artifact (flow_run_id);
CREATE INDEX ix_notification_queue__status_next ON flow_run_notification_queue (status, next_attempt_at);
