-- Runs once, as the superuser, when the PostgreSQL volume is first created:
-- one database for the order service (and its outbox), one for the
-- dispatch center, and a role per job so that nothing but this script runs
-- as a superuser (docs/operations.md "Least privilege"). The passwords are the demo's:
-- change them for anything real.

-- Owns database `orders`; the order service runs as it and migrates its
-- table and the outbox schema (`outbox-relay migrate` runs as it too).
CREATE ROLE orders LOGIN PASSWORD 'orders';
-- The relay: schema `outbox` only, granted by outbox.grant_relay().
CREATE ROLE outbox_relay LOGIN PASSWORD 'outbox_relay';
-- V5 had it own the functions outbox.capture generates; since V7 each
-- captured table has a role of its own (outbox_capture_<db oid>_<table
-- oid>), which `orders` cannot create (no CREATEROLE): the stack captures
-- nothing, and `capture` prints the CREATE ROLE and GRANT to run here
-- as the superuser if you add one (docs/capture.md).
CREATE ROLE outbox_capture NOLOGIN;
GRANT outbox_capture TO orders;
-- The operator console: reads the outbox, requeues, discards and replays,
-- granted by outbox.grant_console().
CREATE ROLE outbox_console LOGIN PASSWORD 'outbox_console';
-- Owns schema `dispatch`: runs `dispatch migrate` and nothing else.
CREATE ROLE dispatch_owner LOGIN PASSWORD 'dispatch_owner';
-- The consumer: its own tables only, granted by dispatch.grant_consumer().
CREATE ROLE dispatch_consumer LOGIN PASSWORD 'dispatch_consumer';

CREATE DATABASE orders OWNER orders;
CREATE DATABASE dispatch OWNER dispatch_owner;

-- Only the roles that work in a database may connect to it.
REVOKE CONNECT, TEMPORARY ON DATABASE orders FROM PUBLIC;
GRANT CONNECT ON DATABASE orders TO outbox_relay;
GRANT CONNECT ON DATABASE orders TO outbox_console;
REVOKE CONNECT, TEMPORARY ON DATABASE dispatch FROM PUBLIC;
GRANT CONNECT ON DATABASE dispatch TO dispatch_consumer;
