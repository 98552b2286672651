-- Runs once when the PostgreSQL volume is first created: one database for
-- the order service (and its outbox), one for the dispatch center.
CREATE DATABASE orders;
CREATE DATABASE dispatch;
