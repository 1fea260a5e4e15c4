-- 0004: drop the events, configuration and concurrency lease tables (their indexes go with them)
DROP TABLE concurrency_lease;
DROP TABLE configuration;
DROP TABLE event_resources;
DROP TABLE events;
