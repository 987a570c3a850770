-- pgbridge's schema as it is now, in one file: the reference of what exists, top to bottom.
--
-- For a database that has no pgbridge schema yet: `psql -v ON_ERROR_STOP=1 -f sql/schema.sql`, or
-- `pgbridge migrate`, which applies this file to such a database. It stands for the numbered migrations
-- 001_change_log to 005_relay and records them in pgbridge.migrations, so a later
-- migration applies over it as over a database that took them one by one. Over an existing pgbridge
-- schema it refuses and changes nothing: upgrades are the numbered files sql/NNN_*.sql, in order.
--
-- This file and the migrations must make the same schema: tests/db/test_schema.py compares their
-- catalogs. A change to the SQL is a new numbered migration and the same change here.
--
--   1. The schema, and the migrations it stands for
--   2. Tables: publications, the change log (changes, ticks), leases, channels
--   3. Capture: the trigger function and its wake-up
--   4. Publishing: publish, unpublish, and what they call
--   5. The bridge's side: ticks, flushing, snapshots
--   6. Dropped tables: the event trigger
--   7. Bridges of 0.1
--   8. Roles and privileges
--   9. The first tick

BEGIN;
SET LOCAL client_min_messages = warning;

-- Only for a database without the pgbridge schema: over one, the migrations are the way (they know what
-- each version had); this file would fail halfway or, worse, install next to what is there.
DO $$
DECLARE
    installed integer;
BEGIN
    IF to_regnamespace('pgbridge') IS NULL THEN
        RETURN;
    END IF;
    IF to_regclass('pgbridge.migrations') IS NOT NULL THEN
        EXECUTE 'SELECT max(version) FROM pgbridge.migrations' INTO installed;
        RAISE EXCEPTION 'pgbridge schema version % is already installed: sql/schema.sql is only for a database '
                        'without the pgbridge schema, and changed nothing', coalesce(installed::text, '(none)')
            USING HINT = 'To upgrade, run `pgbridge migrate`: it applies the migrations a database lacks '
                         '(by hand: the files sql/NNN_*.sql numbered above the installed version, in order).';
    END IF;
    RAISE EXCEPTION 'this database already has a schema named pgbridge (without pgbridge.migrations): '
                    'sql/schema.sql is only for a database without one, and changed nothing'
        USING HINT = '`pgbridge migrate` applies the migrations a database lacks: over this schema, all of them.';
END
$$;


-- 1. The schema, and the migrations it stands for ---------------------------------------------------

CREATE SCHEMA pgbridge;

-- One row per migration applied. A bridge reads max(version) to know what the database has; each
-- numbered file refuses to run where a newer version is recorded.
CREATE TABLE pgbridge.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgbridge.migrations (version, name) VALUES
    (1, '001_change_log'),
    (2, '002_ticks'),
    (3, '003_wake_and_snapshots'),
    (4, '004_ticker'),
    (5, '005_relay');

-- What a bridge checks before it reads the log: the format of pgbridge.changes and pgbridge.ticks. A
-- later migration that keeps the format keeps this value, so bridges of this version keep working.
CREATE FUNCTION pgbridge.log_format() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 2 $$;


-- 2. Tables ------------------------------------------------------------------------------------------

-- One row per published table: the only source of its collection name and hidden columns. The capture
-- triggers carry them as arguments (see attach_v3), set again whenever the table is published.
CREATE TABLE pgbridge.publications (
    relid            regclass PRIMARY KEY,
    collection       text NOT NULL UNIQUE,
    excluded         text[] NOT NULL DEFAULT '{}',
    excluded_attnums smallint[] NOT NULL DEFAULT '{}',
    wake             boolean NOT NULL DEFAULT true
);
COMMENT ON COLUMN pgbridge.publications.excluded IS
    'Column names hidden when published: a column added later under one of these names is hidden too.';
COMMENT ON COLUMN pgbridge.publications.excluded_attnums IS
    'The hidden columns by identity: they stay hidden when renamed.';
COMMENT ON COLUMN pgbridge.publications.wake IS
    'Send a wake-up NOTIFY per statement (low latency; commits then serialize on NOTIFY''s lock). '
    'Without it, writers take no database-wide lock and the bridge polls.';

-- The change log, and how positions work. A writer's statement adds one row per chunk of changed rows
-- to pgbridge.changes (its transaction id in `xid`) and, unless its table is published with
-- wake => false, sends an empty NOTIFY as a wake-up. Nothing else: no lock, no commit-time work. The
-- bridge then records a tick, a snapshot of which transactions have committed (pgbridge.tick_v3). Tick
-- n's batch is the changes of the transactions that committed between tick n-1 and tick n; a change's
-- position is (tick, id). Ticks are durable and taken one at a time, so every bridge computes the same
-- batches in the same order, and a batch never changes once its tick exists: nothing can later appear
-- before a position a client has seen. Within a tick, changes are in id order; a change always comes
-- after the changes it depended on (a statement that waited for, or read, another transaction's commit
-- takes a later id).
CREATE TABLE pgbridge.changes (
    id         bigserial PRIMARY KEY,
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    collection text NOT NULL,
    op         text NOT NULL CHECK (op IN ('create', 'update', 'delete', 'truncate')),
    changed_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    nrows      integer NOT NULL,
    body       text NOT NULL
);
CREATE INDEX changes_xid_idx ON pgbridge.changes (xid, id);
COMMENT ON TABLE pgbridge.changes IS
    'One row per chunk (at most 1000 rows or about 1 MB) of the rows one statement changed, one JSON '
    'row per line; for an update, each new row''s line is followed by the old row''s. A truncate has no '
    'rows. Positions come from pgbridge.ticks.';

CREATE TABLE pgbridge.ticks (
    n            bigint PRIMARY KEY,
    snap         pg_snapshot NOT NULL,
    snap_xmax    xid8 NOT NULL,
    min_id       bigint,
    max_id       bigint,
    changes      bigint NOT NULL,
    transactions bigint NOT NULL,
    total        bigint NOT NULL,
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ticks_snap_xmax_idx ON pgbridge.ticks (snap_xmax, n);
COMMENT ON TABLE pgbridge.ticks IS
    'Tick n: which transactions had committed (snap) when the bridge took it. Its batch is the changes '
    'visible in snap and not in tick n-1''s: `changes` entries of `transactions` transactions, all with '
    'ids in [min_id, max_id]. total counts transactions since the first tick. Written only by pgbridge.tick_v2().';

-- Only roles that may update this table can take a lease, unlike an advisory lock, which any role can
-- take and hold. `prune` and `flush` are row locks a bridge holds for one short transaction: one bridge
-- at a time deletes old changes and ticks; flush_v2 writes its row. `ticker` is a time: the bridge named
-- `holder` takes the ticks and listens for writers' wake-ups until `until`; it renews the lease long
-- before, and another bridge takes it once it lapses. It records each durable tick as `announced`, and
-- holds the advisory lock (key, announced + 1), which the other bridges wait on (await_tick_v4); `key`
-- is random and secret, so that no other role can take that lock. The ticker also serves the pages it
-- routes to the other bridges at `relay`, to those that show `relay_secret` (pgbridge/relay.py).
CREATE TABLE pgbridge.leases (name text PRIMARY KEY, holder text, until timestamptz, announced bigint, key integer,
                              relay text, relay_secret text);
COMMENT ON TABLE pgbridge.leases IS
    'prune and flush: row locks, held for one short transaction. ticker: the bridge (holder) that takes '
    'ticks until `until`, the last tick it announced, the advisory lock class (key, secret) it holds '
    'the lock (key, announced + 1) of, which the others wait on, and where it relays its pages to them '
    '(relay, a URL, and relay_secret, which they show).';
INSERT INTO pgbridge.leases (name) VALUES ('prune'), ('flush');
INSERT INTO pgbridge.leases (name, key) VALUES ('ticker', floor(random() * 2147483647)::integer);

-- The channels pgbridge notifies on. Their names are random, made here at install, and this table is
-- closed to every role but the schema's owner and bridges (grant_bridge): a role that cannot read it
-- cannot LISTEN to them, nor send on them.
CREATE TABLE pgbridge.channels (
    purpose text PRIMARY KEY CHECK (purpose IN ('wake', 'publications')),
    name    text NOT NULL UNIQUE
);
COMMENT ON TABLE pgbridge.channels IS
    'The NOTIFY channels of pgbridge: wake (a statement changed a published table) and publications (the '
    'published tables changed). Random names, known only to roles that may read this table.';
INSERT INTO pgbridge.channels (purpose, name)
SELECT purpose, 'pgbridge_' || purpose || '_' || replace(gen_random_uuid()::text, '-', '')
FROM unnest(ARRAY['wake', 'publications']) AS purpose;


-- 3. Capture -----------------------------------------------------------------------------------------

-- Statement-level capture: the function of the four triggers (insert, update, delete, truncate) that
-- publishing attaches to a table. Its arguments, set by pgbridge.publish, are the collection, whether to
-- send a wake-up, and the hidden columns by number and by name. They can be trusted: only roles that
-- may execute this function (the schema's owner) can attach it to a table.
-- Names of the user's table can never be captured here: rows are referenced as whole rows of the
-- transition tables (pgbridge_new.*), plpgsql variables win over column names, and every other name
-- in the SQL text is an alias of pgbridge's own subqueries.
-- An UPDATE's OLD and NEW transition tables are filled in lockstep, one pair per updated row, so the
-- n-th old row is the n-th new row: that pairs rows whose key changed and tables without a key.
-- Statements of up to 1000 rows and 1 MB take one INSERT; larger ones are written in chunks.
--
-- The wake-up can never fail a write. PostgreSQL checks the NOTIFY queue at commit, where nothing can
-- catch the error: a full queue fails the commit of every transaction that notified. Any role can fill
-- the queue (it only needs to LISTEN, stay in a transaction, and notify). So capture notifies only while
-- the queue is less than half full; past that, writers send nothing and the bridge polls. And the
-- wake-up goes to a channel whose name is random and readable only by pgbridge's roles (see
-- pgbridge.channels), so no other role can flood the bridge with notifications it would have to read.
CREATE FUNCTION pgbridge.capture_v3() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    pgb_max_rows  CONSTANT integer := 1000;
    pgb_max_bytes CONSTANT integer := 1048576;
    pgb_wake_below CONSTANT double precision := 0.5;
    pgb_coll      text := TG_ARGV[0];
    pgb_wake      boolean := TG_ARGV[1];
    pgb_hidden    text[];
    pgb_op        text;
    pgb_written   bigint;
    pgb_lines     text[] := '{}';
    pgb_n         integer := 0;
    pgb_bytes     bigint := 0;
    pgb_line      text;
    pgb_rows      refcursor;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO pgbridge.changes (collection, op, nrows, body) VALUES (pgb_coll, 'truncate', 0, '');
        pgb_written := 1;
    ELSE
        pgb_op := CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'update' ELSE 'delete' END;
        pgb_hidden := TG_ARGV[3]::text[];
        IF TG_ARGV[2] <> '{}' THEN  -- hidden by number too: under their current names
            pgb_hidden := pgb_hidden || ARRAY(SELECT a.attname::text FROM pg_attribute a
                                              WHERE a.attrelid = TG_RELID
                                                AND a.attnum = ANY (TG_ARGV[2]::smallint[])
                                                AND NOT a.attisdropped);
        END IF;

        IF TG_OP = 'INSERT' THEN
            INSERT INTO pgbridge.changes (collection, op, nrows, body)
            SELECT pgb_coll, pgb_op, count(*), string_agg(s.line, E'\n')
            FROM (SELECT (to_jsonb(pgbridge_new.*) - pgb_hidden)::text AS line FROM pgbridge_new LIMIT 1001) s
            HAVING count(*) BETWEEN 1 AND pgb_max_rows AND sum(octet_length(s.line)) <= pgb_max_bytes;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO pgbridge.changes (collection, op, nrows, body)
            SELECT pgb_coll, pgb_op, count(*), string_agg(s.line, E'\n')
            FROM (SELECT (to_jsonb(pgbridge_old.*) - pgb_hidden)::text AS line FROM pgbridge_old LIMIT 1001) s
            HAVING count(*) BETWEEN 1 AND pgb_max_rows AND sum(octet_length(s.line)) <= pgb_max_bytes;
        ELSE
            -- An update that changed only hidden columns is not a change anyone may see: it is left out.
            INSERT INTO pgbridge.changes (collection, op, nrows, body)
            SELECT pgb_coll, pgb_op, count(*) FILTER (WHERE s.shown),
                   string_agg(s.line, E'\n' ORDER BY s.i) FILTER (WHERE s.shown)
            FROM (SELECT nw.i, nw.vis::text || E'\n' || od.vis::text AS line,
                         nw.vis <> od.vis OR nw.whole = od.whole AS shown
                  FROM (SELECT row_number() OVER () AS i, to_jsonb(pgbridge_new.*) AS whole,
                               to_jsonb(pgbridge_new.*) - pgb_hidden AS vis
                        FROM pgbridge_new LIMIT 1001) nw
                  JOIN (SELECT row_number() OVER () AS i, to_jsonb(pgbridge_old.*) AS whole,
                               to_jsonb(pgbridge_old.*) - pgb_hidden AS vis
                        FROM pgbridge_old LIMIT 1001) od ON od.i = nw.i) s
            HAVING count(*) BETWEEN 1 AND pgb_max_rows AND sum(octet_length(s.line)) <= pgb_max_bytes
               AND count(*) FILTER (WHERE s.shown) > 0;
        END IF;
        GET DIAGNOSTICS pgb_written = ROW_COUNT;

        IF pgb_written = 0 THEN
            -- Empty, larger than one chunk, or an update of hidden columns only: row by row, in chunks.
            IF TG_OP = 'INSERT' THEN
                OPEN pgb_rows FOR SELECT (to_jsonb(pgbridge_new.*) - pgb_hidden)::text FROM pgbridge_new;
            ELSIF TG_OP = 'DELETE' THEN
                OPEN pgb_rows FOR SELECT (to_jsonb(pgbridge_old.*) - pgb_hidden)::text FROM pgbridge_old;
            ELSE
                OPEN pgb_rows FOR
                    SELECT nw.vis::text || E'\n' || od.vis::text
                    FROM (SELECT row_number() OVER () AS i, to_jsonb(pgbridge_new.*) AS whole,
                                 to_jsonb(pgbridge_new.*) - pgb_hidden AS vis FROM pgbridge_new) nw
                    JOIN (SELECT row_number() OVER () AS i, to_jsonb(pgbridge_old.*) AS whole,
                                 to_jsonb(pgbridge_old.*) - pgb_hidden AS vis FROM pgbridge_old) od ON od.i = nw.i
                    WHERE nw.vis <> od.vis OR nw.whole = od.whole
                    ORDER BY nw.i;
            END IF;
            LOOP
                FETCH pgb_rows INTO pgb_line;
                EXIT WHEN NOT FOUND;
                pgb_lines := pgb_lines || pgb_line;
                pgb_n := pgb_n + 1;
                pgb_bytes := pgb_bytes + octet_length(pgb_line);
                IF pgb_n >= pgb_max_rows OR pgb_bytes >= pgb_max_bytes THEN
                    INSERT INTO pgbridge.changes (collection, op, nrows, body)
                    VALUES (pgb_coll, pgb_op, pgb_n, array_to_string(pgb_lines, E'\n'));
                    pgb_written := pgb_written + 1;
                    pgb_lines := '{}';
                    pgb_n := 0;
                    pgb_bytes := 0;
                END IF;
            END LOOP;
            CLOSE pgb_rows;
            IF pgb_n > 0 THEN
                INSERT INTO pgbridge.changes (collection, op, nrows, body)
                VALUES (pgb_coll, pgb_op, pgb_n, array_to_string(pgb_lines, E'\n'));
                pgb_written := pgb_written + 1;
            END IF;
        END IF;
    END IF;
    -- The wake-up carries nothing; past half a queue, none is sent (a full queue would fail this commit).
    IF pgb_written > 0 AND pgb_wake AND pg_notification_queue_usage() < pgb_wake_below THEN
        PERFORM pg_notify((SELECT c.name FROM pgbridge.channels c WHERE c.purpose = 'wake'), '');
    END IF;
    RETURN NULL;
END
$$;


-- 4. Publishing --------------------------------------------------------------------------------------

-- Publishes a table as a collection (by default named after the table), with the columns in `exclude`
-- hidden, and without wake-ups if wake => false (see pgbridge.publications). A mistake is an error that
-- names it. It runs as its caller, not as the schema's owner: only the owner (and superusers) may execute
-- it, and creating the capture triggers also needs the right to create triggers on the table.
CREATE FUNCTION pgbridge.publish(
    tbl regclass, exclude text[] DEFAULT '{}', collection text DEFAULT NULL, wake boolean DEFAULT true
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    rel     record;
    coll    text;
    missing text;
    holder  regclass;
BEGIN
    SELECT c.relname, c.relkind, n.nspname INTO rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF NOT FOUND OR rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cannot publish %: only tables can be published', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF rel.nspname = 'pgbridge' THEN
        RAISE EXCEPTION 'cannot publish %: pgbridge''s own tables are not published', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    coll := coalesce(collection, rel.relname);
    IF coll !~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'invalid collection name "%"', coll
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use letters, digits and underscores, or pass collection => ''name''.';
    END IF;
    -- A table dropped while the event trigger was not installed still holds its collection name.
    DELETE FROM pgbridge.publications p WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.relid);
    IF EXISTS (SELECT 1 FROM pgbridge.publications p WHERE p.relid = tbl) THEN
        RAISE EXCEPTION 'table % is already published', tbl
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Call pgbridge.unpublish first to change how it is published.';
    END IF;
    SELECT p.relid INTO holder FROM pgbridge.publications p WHERE p.collection = coll;
    IF FOUND THEN
        RAISE EXCEPTION 'collection "%" is already used by table %', coll, holder
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Pass another name: pgbridge.publish(''...'', collection => ''name'').';
    END IF;
    SELECT string_agg(x, ', ') INTO missing
    FROM unnest(exclude) AS x
    WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = tbl AND a.attname = x AND a.attnum > 0 AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'table % has no column(s) %', tbl, missing USING ERRCODE = 'undefined_column';
    END IF;

    INSERT INTO pgbridge.publications (relid, collection, excluded, excluded_attnums, wake)
    VALUES (tbl, coll, exclude,
            ARRAY(SELECT a.attnum FROM pg_attribute a
                  WHERE a.attrelid = tbl AND a.attname = ANY (exclude) AND a.attnum > 0 AND NOT a.attisdropped),
            wake);
    PERFORM pgbridge.attach_v3(tbl);
    PERFORM pgbridge.announce_v3(coll);
    RETURN coll;
END
$$;

-- Stops capturing a table and frees its collection name.
CREATE FUNCTION pgbridge.unpublish(tbl regclass) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    coll text;
BEGIN
    DELETE FROM pgbridge.publications p WHERE p.relid = tbl RETURNING p.collection INTO coll;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not published', tbl USING ERRCODE = 'undefined_object';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tbl) THEN  -- else the table is gone, and its triggers with it
        PERFORM pgbridge.detach_v3(tbl);
    END IF;
    PERFORM pgbridge.announce_v3(coll);
    RETURN coll;
END
$$;

-- Attaches capture to a published table (its four triggers), with the publication as arguments.
-- Quiet: dropping triggers that are not there is not worth a notice.
CREATE FUNCTION pgbridge.attach_v3(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $$
DECLARE
    pub    record;
    target text;
    args   text;
BEGIN
    SELECT p.*, format('%I.%I', n.nspname, c.relname) AS target INTO pub
    FROM pgbridge.publications p JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE p.relid = tbl;
    args := format('%L, %L, %L, %L', pub.collection, pub.wake, pub.excluded_attnums, pub.excluded);
    target := pub.target;
    PERFORM pgbridge.detach_v3(tbl);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS pgbridge_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture_v3(%s)', target, args);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS pgbridge_old NEW TABLE AS pgbridge_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture_v3(%s)', target, args);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS pgbridge_old FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture_v3(%s)', target, args);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION pgbridge.capture_v3(%s)', target, args);
END
$$;

-- Removes capture from a table, whichever of its triggers are there.
CREATE FUNCTION pgbridge.detach_v3(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $$
DECLARE
    trigger name;
BEGIN
    FOR trigger IN SELECT t.tgname FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname IN
                       ('pgbridge_capture_insert', 'pgbridge_capture_update', 'pgbridge_capture_delete',
                        'pgbridge_capture_truncate')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger, tbl);
    END LOOP;
END
$$;

-- Tells running bridges that the published tables changed. Like the wake-up, it is skipped rather than
-- allowed to fail the transaction when the queue fills up: bridges also reread publications by themselves.
CREATE FUNCTION pgbridge.announce_v3(coll text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pgb_wake_below CONSTANT double precision := 0.5;
BEGIN
    IF pg_notification_queue_usage() < pgb_wake_below THEN
        PERFORM pg_notify((SELECT c.name FROM pgbridge.channels c WHERE c.purpose = 'publications'), coll);
    END IF;
END
$$;


-- 5. The bridge's side -------------------------------------------------------------------------------

-- Records a tick if any transaction with changes committed since the last one; returns the newest tick
-- and when it was taken (a tick taken again after a crash lost it has another time). With `export`, the
-- snapshot of the tick returned is also exported (pg_export_snapshot): call it in a transaction block and
-- import the snapshot elsewhere (SET TRANSACTION SNAPSHOT) before that transaction ends, and what the
-- importer reads is exactly what committed up to that tick.
-- Ticks are serialized by a lock on pgbridge.ticks, and each snapshot is taken once that lock is held,
-- so every tick's snapshot sees everything the previous one saw.
CREATE FUNCTION pgbridge.tick_v3(export boolean DEFAULT false,
                                            OUT n bigint, OUT at timestamptz, OUT snapshot text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last_snap  pg_snapshot;
    last_total bigint;
    now_snap   pg_snapshot;
    batch      record;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgbridge.tick_v3() needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    LOCK TABLE pgbridge.ticks IN EXCLUSIVE MODE;
    SELECT t.n, t.at, t.snap, t.total INTO n, at, last_snap, last_total
    FROM pgbridge.ticks t ORDER BY t.n DESC LIMIT 1;
    IF export THEN  -- one statement, so that both are the same snapshot
        SELECT pg_current_snapshot(), pg_export_snapshot() INTO now_snap, snapshot;
    ELSE
        now_snap := pg_current_snapshot();
    END IF;
    SELECT count(*) AS changes, count(DISTINCT c.xid) AS transactions, min(c.id) AS min_id, max(c.id) AS max_id
    INTO batch
    FROM pgbridge.changes c
    WHERE (c.xid >= pg_snapshot_xmax(last_snap) AND c.xid < pg_snapshot_xmax(now_snap)
           OR c.xid = ANY (ARRAY(SELECT pg_snapshot_xip(last_snap))))
      AND pg_visible_in_snapshot(c.xid, now_snap);
    -- With no new transaction, the last tick and now_snap see the same changes: an exported now_snap
    -- stands for the last tick.
    IF batch.transactions = 0 THEN
        RETURN;
    END IF;
    INSERT INTO pgbridge.ticks AS t (n, snap, snap_xmax, min_id, max_id, changes, transactions, total)
    VALUES (n + 1, now_snap, pg_snapshot_xmax(now_snap), batch.min_id, batch.max_id, batch.changes,
            batch.transactions, last_total + batch.transactions)
    RETURNING t.n, t.at INTO n, at;
END
$$;

-- Bridges of 0.2 call tick_v2: one implementation for both.
CREATE FUNCTION pgbridge.tick_v2(OUT n bigint, OUT at timestamptz)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT t.n, t.at FROM pgbridge.tick_v3(false) t $$;

-- Makes everything committed so far durable, run in a transaction that commits synchronously. It must
-- write: PostgreSQL does not flush for a transaction whose only WAL is its commit record.
CREATE FUNCTION pgbridge.flush_v2() RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ UPDATE pgbridge.leases SET name = name WHERE name = 'flush' $$;

-- The rows of a published table as its changes carry them (hidden columns removed inside the database),
-- as a cursor named `cur` that the caller fetches from. Call it in the transaction whose snapshot the
-- rows must come from. It runs as the schema's owner, so a bridge needs no grant on the table.
CREATE FUNCTION pgbridge.snapshot_v3(coll text, cur refcursor) RETURNS refcursor
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    pub    record;
    hidden text[];
BEGIN
    SELECT p.relid, p.excluded, p.excluded_attnums INTO pub FROM pgbridge.publications p WHERE p.collection = coll;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'collection "%" is not published', coll USING ERRCODE = 'undefined_object';
    END IF;
    hidden := pub.excluded || ARRAY(SELECT a.attname::text FROM pg_attribute a
                                    WHERE a.attrelid = pub.relid AND a.attnum = ANY (pub.excluded_attnums)
                                      AND NOT a.attisdropped);
    OPEN cur FOR EXECUTE format('SELECT (to_jsonb(t.*) - $1)::text FROM %s t', pub.relid::regclass) USING hidden;
    RETURN cur;
END
$$;

-- Timestamps as the bridge sends them: UTC, milliseconds, ISO 8601.
CREATE FUNCTION pgbridge.iso(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;


-- A bridge that follows the ticker waits here, at most `wait_ms` milliseconds, for a tick after `after`
-- to be announced; it gets the newest announced tick and when it was taken (n may still be `after`, or
-- NULL before any announcement). `waited` is true when it waited for the ticker: false when a newer tick
-- was there already, or when nobody holds the lock it would wait on (no ticker: the caller waits before
-- it asks again). Waiting is taking that lock, shared: no
-- notification, no polling. Its class is secret, so no other role can hold the followers up.
CREATE OR REPLACE FUNCTION pgbridge.await_tick_v4(after bigint, wait_ms integer,
                                                  OUT n bigint, OUT at timestamptz, OUT waited boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lock_class integer;
BEGIN
    SELECT l.announced, l.key INTO n, lock_class FROM pgbridge.leases l WHERE l.name = 'ticker';
    waited := false;
    IF n <= after THEN
        -- Free: the ticker has just moved on (it takes the next lock before it records a tick), or
        -- nobody ticks. Either way the announced tick is read again.
        IF NOT pg_try_advisory_xact_lock_shared(lock_class, ((n + 1) % 2147483648)::integer) THEN
            waited := true;
            PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
            BEGIN
                PERFORM pg_advisory_xact_lock_shared(lock_class, ((n + 1) % 2147483648)::integer);
            EXCEPTION WHEN lock_not_available THEN
                NULL;
            END;
        END IF;
        SELECT l.announced INTO n FROM pgbridge.leases l WHERE l.name = 'ticker';
    END IF;
    SELECT t.at INTO at FROM pgbridge.ticks t WHERE t.n = await_tick_v4.n;
END
$$;


-- 6. Dropped tables ----------------------------------------------------------------------------------

-- Dropping a published table unpublishes it. That takes an event trigger, which only a superuser can
-- create: installed by anyone else, a dropped table keeps its collection name until the next
-- pgbridge.publish frees it.
CREATE FUNCTION pgbridge.forget_dropped_v3() RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    gone text;
BEGIN
    FOR gone IN
        DELETE FROM pgbridge.publications p
        USING pg_event_trigger_dropped_objects() d
        WHERE d.classid = 'pg_class'::regclass AND d.objid = p.relid AND d.objsubid = 0
        RETURNING p.collection
    LOOP
        PERFORM pgbridge.announce_v3(gone);
    END LOOP;
END
$$;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER pgbridge_forget_dropped ON sql_drop EXECUTE FUNCTION pgbridge.forget_dropped_v3();
    ELSE
        RAISE WARNING 'pgbridge: not a superuser, so dropping a published table will not unpublish it'
            USING HINT = 'Its collection is freed by the next pgbridge.publish, or a superuser can run: CREATE EVENT '
                         'TRIGGER pgbridge_forget_dropped ON sql_drop EXECUTE FUNCTION pgbridge.forget_dropped_v3();';
    END IF;
END
$$;


-- 7. Bridges of 0.1 ----------------------------------------------------------------------------------

-- A bridge of 0.1 (schema 001) read pgbridge.commits; tell it plainly why it cannot work here.
CREATE FUNCTION pgbridge.refuse_v1_bridge() RETURNS TABLE (seq bigint, xid xid8, committed_at timestamptz)
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'this database has pgbridge schema version 2, which pgbridge 0.1 cannot read'
        USING HINT = 'Upgrade the bridge to pgbridge 0.2 or later.';
END
$$;
CREATE VIEW pgbridge.commits AS SELECT * FROM pgbridge.refuse_v1_bridge();


-- 8. Roles and privileges ----------------------------------------------------------------------------

-- What a bridge needs when it connects as a role of its own rather than as this schema's owner.
CREATE FUNCTION pgbridge.grant_bridge(bridge regrole) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA pgbridge TO %s', bridge);
    EXECUTE format('GRANT SELECT ON pgbridge.changes, pgbridge.ticks, pgbridge.publications, pgbridge.migrations, '
                   'pgbridge.channels TO %s', bridge);
    EXECUTE format('GRANT DELETE ON pgbridge.changes, pgbridge.ticks TO %s', bridge);  -- pruning
    EXECUTE format('GRANT SELECT, UPDATE ON pgbridge.leases TO %s', bridge);  -- one pruner, one ticker
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgbridge.tick_v2(), pgbridge.tick_v3(boolean), pgbridge.flush_v2(), '
                   'pgbridge.snapshot_v3(text, refcursor), pgbridge.await_tick_v4(bigint, integer), '
                   'pgbridge.log_format(), pgbridge.iso(timestamptz) TO %s', bridge);
END
$$;

-- Nothing in this schema is for other roles: the change log holds rows of every published table, and
-- LISTEN has no privileges of its own, so notifications carry no data either. Writers need no grant:
-- the capture trigger runs as this schema's owner. (Functions are executable by PUBLIC by default:
-- these revokes are what close them.)
REVOKE ALL ON SCHEMA pgbridge FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgbridge FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgbridge FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgbridge FROM PUBLIC;


-- 9. The first tick ----------------------------------------------------------------------------------

-- Changes of transactions that commit after it are the first batch.
INSERT INTO pgbridge.ticks (n, snap, snap_xmax, changes, transactions, total)
VALUES (0, pg_current_snapshot(), pg_snapshot_xmax(pg_current_snapshot()), 0, 0, 0);

COMMIT;
