-- pgbridge 002: positions from transaction snapshots, so writers take no lock of pgbridge's; a change log
-- that no database role but its owner can read, forge or stall; hidden columns by identity; TRUNCATE.
--
-- Apply by hand with `psql -v ON_ERROR_STOP=1 -f sql/002_ticks.sql` (after 001), or with
-- `pgbridge migrate`. Safe to apply more than once; refuses to run over a newer schema.
--
-- How positions work. A writer's statement adds one row per chunk of changed rows to pgbridge.changes
-- (its transaction id in `xid`) and, unless its table is published with wake => false, sends an empty
-- NOTIFY as a wake-up. Nothing else: no lock, no commit-time work. The bridge then records a tick, a
-- snapshot of which transactions have committed (pgbridge.tick_v2). Tick n's batch is the changes of
-- the transactions that committed between tick n-1 and tick n; a change's position is (tick, id).
-- Ticks are durable and taken one at a time, so every bridge computes the same batches in the same
-- order, and a batch never changes once its tick exists: nothing can later appear before a position a
-- client has seen. Within a tick, changes are in id order; a change always comes after the changes it
-- depended on (a statement that waited for, or read, another transaction's commit takes a later id).

BEGIN;
SET LOCAL client_min_messages = warning;

DO $$
DECLARE
    installed integer;
BEGIN
    IF to_regclass('pgbridge.migrations') IS NOT NULL THEN
        EXECUTE 'SELECT max(version) FROM pgbridge.migrations' INTO installed;
    END IF;
    IF installed IS NULL THEN
        RAISE EXCEPTION 'pgbridge migration 001 is not applied'
            USING HINT = 'Apply sql/001_change_log.sql first, or run `pgbridge migrate`.';
    END IF;
    IF installed > 2 THEN
        RAISE EXCEPTION 'pgbridge schema version % is installed; 002 is older and was not applied', installed
            USING HINT = 'Nothing to do: `pgbridge migrate` applies only the migrations a database lacks.';
    END IF;
END
$$;

-- What a bridge checks before it reads the log: the format of pgbridge.changes and pgbridge.ticks. A
-- later migration that keeps the format keeps this value, so bridges of this version keep working.
CREATE OR REPLACE FUNCTION pgbridge.log_format() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 2 $$;

ALTER TABLE pgbridge.publications
    ADD COLUMN IF NOT EXISTS excluded_attnums smallint[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS wake boolean NOT NULL DEFAULT true;
COMMENT ON COLUMN pgbridge.publications.excluded IS
    'Column names hidden when published: a column added later under one of these names is hidden too.';
COMMENT ON COLUMN pgbridge.publications.excluded_attnums IS
    'The hidden columns by identity: they stay hidden when renamed.';
COMMENT ON COLUMN pgbridge.publications.wake IS
    'Send a wake-up NOTIFY per statement (low latency; commits then serialize on NOTIFY''s lock). '
    'Without it, writers take no database-wide lock and the bridge polls.';

ALTER TABLE pgbridge.changes DROP CONSTRAINT IF EXISTS changes_op_check;
ALTER TABLE pgbridge.changes ADD CONSTRAINT changes_op_check
    CHECK (op IN ('create', 'update', 'delete', 'truncate'));
COMMENT ON TABLE pgbridge.changes IS
    'One row per chunk (at most 1000 rows or about 1 MB) of the rows one statement changed, one JSON '
    'row per line; for an update, each new row''s line is followed by the old row''s. A truncate has no '
    'rows. Positions come from pgbridge.ticks.';

CREATE TABLE IF NOT EXISTS pgbridge.ticks (
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
CREATE INDEX IF NOT EXISTS ticks_snap_xmax_idx ON pgbridge.ticks (snap_xmax, n);
COMMENT ON TABLE pgbridge.ticks IS
    'Tick n: which transactions had committed (snap) when the bridge took it. Its batch is the changes '
    'visible in snap and not in tick n-1''s: `changes` entries of `transactions` transactions, all with '
    'ids in [min_id, max_id]. total counts transactions since the first tick. Written only by pgbridge.tick_v2().';

-- A lease is a row lock a bridge holds for one short transaction; only roles that may update this
-- table can take one, unlike an advisory lock, which any role can take and hold.
CREATE TABLE IF NOT EXISTS pgbridge.leases (name text PRIMARY KEY);
INSERT INTO pgbridge.leases VALUES ('prune'), ('flush') ON CONFLICT DO NOTHING;

-- Makes everything committed so far durable, run in a transaction that commits synchronously. It must
-- write: PostgreSQL does not flush for a transaction whose only WAL is its commit record.
CREATE OR REPLACE FUNCTION pgbridge.flush_v2() RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ UPDATE pgbridge.leases SET name = name WHERE name = 'flush' $$;

-- Records a tick if any transaction with changes committed since the last one; returns the newest tick
-- and when it was taken (a tick taken again after a crash lost it has another time).
-- Ticks are serialized by a lock on pgbridge.ticks, and each snapshot is taken once that lock is held,
-- so every tick's snapshot sees everything the previous one saw.
CREATE OR REPLACE FUNCTION pgbridge.tick_v2(OUT n bigint, OUT at timestamptz)
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
        RAISE EXCEPTION 'pgbridge.tick_v2() needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    LOCK TABLE pgbridge.ticks IN EXCLUSIVE MODE;
    SELECT t.n, t.at, t.snap, t.total INTO n, at, last_snap, last_total
    FROM pgbridge.ticks t ORDER BY t.n DESC LIMIT 1;
    now_snap := pg_current_snapshot();
    SELECT count(*) AS changes, count(DISTINCT c.xid) AS transactions, min(c.id) AS min_id, max(c.id) AS max_id
    INTO batch
    FROM pgbridge.changes c
    WHERE (c.xid >= pg_snapshot_xmax(last_snap) AND c.xid < pg_snapshot_xmax(now_snap)
           OR c.xid = ANY (ARRAY(SELECT pg_snapshot_xip(last_snap))))
      AND pg_visible_in_snapshot(c.xid, now_snap);
    IF batch.transactions = 0 THEN
        RETURN;
    END IF;
    INSERT INTO pgbridge.ticks AS t (n, snap, snap_xmax, min_id, max_id, changes, transactions, total)
    VALUES (n + 1, now_snap, pg_snapshot_xmax(now_snap), batch.min_id, batch.max_id, batch.changes,
            batch.transactions, last_total + batch.transactions)
    RETURNING t.n, t.at INTO n, at;
END
$$;

-- Statement-level capture. Its arguments, set by pgbridge.publish, are the collection, whether to send
-- a wake-up, and the hidden columns by number and by name. They can be trusted: only roles that may
-- execute this function (the schema's owner) can attach it to a table.
-- Names of the user's table can never be captured here: rows are referenced as whole rows of the
-- transition tables (pgbridge_new.*), plpgsql variables win over column names, and every other name
-- in the SQL text is an alias of pgbridge's own subqueries.
-- An UPDATE's OLD and NEW transition tables are filled in lockstep, one pair per updated row, so the
-- n-th old row is the n-th new row: that pairs rows whose key changed and tables without a key.
-- Statements of up to 1000 rows and 1 MB take one INSERT; larger ones are written in chunks.
CREATE OR REPLACE FUNCTION pgbridge.capture_v2() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    pgb_max_rows  CONSTANT integer := 1000;
    pgb_max_bytes CONSTANT integer := 1048576;
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
        IF pgb_wake THEN
            PERFORM pg_notify('pgbridge', '2');
        END IF;
        RETURN NULL;
    END IF;
    pgb_op := CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'update' ELSE 'delete' END;
    pgb_hidden := TG_ARGV[3]::text[];
    IF TG_ARGV[2] <> '{}' THEN  -- hidden by number too: under their current names
        pgb_hidden := pgb_hidden || ARRAY(SELECT a.attname::text FROM pg_attribute a
                                          WHERE a.attrelid = TG_RELID AND a.attnum = ANY (TG_ARGV[2]::smallint[])
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
    -- The payload is the log format; a bridge reads nothing from it (any role can NOTIFY).
    IF pgb_written > 0 AND pgb_wake THEN
        PERFORM pg_notify('pgbridge', '2');
    END IF;
    RETURN NULL;
END
$$;

-- Attaches capture to a published table (its four triggers), with the publication as arguments.
CREATE OR REPLACE FUNCTION pgbridge.attach_v2(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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
    EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_insert ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_update ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_delete ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_truncate ON %s', target);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS pgbridge_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture_v2(%s)', target, args);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS pgbridge_old NEW TABLE AS pgbridge_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture_v2(%s)', target, args);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS pgbridge_old FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture_v2(%s)', target, args);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION pgbridge.capture_v2(%s)', target, args);
END
$$;

CREATE OR REPLACE FUNCTION pgbridge.publish(
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
    PERFORM pgbridge.attach_v2(tbl);
    PERFORM pg_notify('pgbridge_publications', coll);
    RETURN coll;
END
$$;

CREATE OR REPLACE FUNCTION pgbridge.unpublish(tbl regclass) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    coll   text;
    target text;
BEGIN
    DELETE FROM pgbridge.publications p WHERE p.relid = tbl RETURNING p.collection INTO coll;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not published', tbl USING ERRCODE = 'undefined_object';
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname) INTO target
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF target IS NOT NULL THEN  -- else the table is gone, and its triggers with it
        EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_insert ON %s', target);
        EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_update ON %s', target);
        EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_delete ON %s', target);
        EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_truncate ON %s', target);
    END IF;
    PERFORM pg_notify('pgbridge_publications', coll);
    RETURN coll;
END
$$;

-- Dropping a published table unpublishes it (an event trigger, so superusers only: see below).
CREATE OR REPLACE FUNCTION pgbridge.forget_dropped_v2() RETURNS event_trigger
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
        PERFORM pg_notify('pgbridge_publications', gone);
    END LOOP;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgbridge_forget_dropped') THEN
        IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            CREATE EVENT TRIGGER pgbridge_forget_dropped ON sql_drop
                EXECUTE FUNCTION pgbridge.forget_dropped_v2();
        ELSE
            RAISE WARNING 'pgbridge: not a superuser, so dropping a published table will not unpublish it'
                USING HINT = 'Its collection is freed by the next pgbridge.publish, or apply this file as a superuser.';
        END IF;
    END IF;
END
$$;

-- The one-time conversion from 001's commit-order lock.
DO $$
DECLARE
    pub record;
BEGIN
    IF EXISTS (SELECT 1 FROM pgbridge.migrations WHERE version = 2) THEN
        RETURN;
    END IF;
    DROP TRIGGER IF EXISTS pgbridge_sequence_commit ON pgbridge.changes;
    DROP FUNCTION IF EXISTS pgbridge.sequence_commit();
    DROP TABLE IF EXISTS pgbridge.commits;
    DROP SEQUENCE IF EXISTS pgbridge.commit_seq;
    -- Positions of 001 are not positions of 002: clients resuming from before the upgrade are asked to
    -- resync (resync_required) instead of being replayed in a different order.
    DELETE FROM pgbridge.changes;
    DELETE FROM pgbridge.publications p WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.relid);
    FOR pub IN SELECT p.relid, p.excluded FROM pgbridge.publications p LOOP
        UPDATE pgbridge.publications p
        SET excluded_attnums = ARRAY(SELECT a.attnum FROM pg_attribute a
                                     WHERE a.attrelid = pub.relid AND a.attname = ANY (pub.excluded)
                                       AND a.attnum > 0 AND NOT a.attisdropped)
        WHERE p.relid = pub.relid;
        PERFORM pgbridge.attach_v2(pub.relid);
    END LOOP;
    DROP FUNCTION IF EXISTS pgbridge.capture() CASCADE;  -- and triggers attached to it by hand
    DROP FUNCTION IF EXISTS pgbridge.emit(text, text, integer, text);
    DROP FUNCTION IF EXISTS pgbridge.publish(regclass, text[], text);
    -- The first tick: changes of transactions that commit after it are the first batch.
    INSERT INTO pgbridge.ticks (n, snap, snap_xmax, changes, transactions, total)
    VALUES (0, pg_current_snapshot(), pg_snapshot_xmax(pg_current_snapshot()), 0, 0, 0);
END
$$;

-- A bridge of 001 reads pgbridge.commits; tell it plainly why it cannot work here.
CREATE OR REPLACE FUNCTION pgbridge.refuse_v1_bridge() RETURNS TABLE (seq bigint, xid xid8, committed_at timestamptz)
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'this database has pgbridge schema version 2, which pgbridge 0.1 cannot read'
        USING HINT = 'Upgrade the bridge to pgbridge 0.2 or later.';
END
$$;
CREATE OR REPLACE VIEW pgbridge.commits AS SELECT * FROM pgbridge.refuse_v1_bridge();

-- What a bridge needs when it connects as a role of its own rather than as this schema's owner.
CREATE OR REPLACE FUNCTION pgbridge.grant_bridge(bridge regrole) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA pgbridge TO %s', bridge);
    EXECUTE format('GRANT SELECT ON pgbridge.changes, pgbridge.ticks, pgbridge.publications, pgbridge.migrations '
                   'TO %s', bridge);
    EXECUTE format('GRANT DELETE ON pgbridge.changes, pgbridge.ticks TO %s', bridge);  -- pruning
    EXECUTE format('GRANT SELECT, UPDATE ON pgbridge.leases TO %s', bridge);  -- one pruner at a time
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgbridge.tick_v2(), pgbridge.flush_v2(), pgbridge.log_format(), '
                   'pgbridge.iso(timestamptz) TO %s', bridge);
END
$$;

-- Nothing in this schema is for other roles: the change log holds rows of every published table, and
-- LISTEN has no privileges of its own, so notifications carry no data either. Writers need no grant:
-- the capture trigger runs as this schema's owner.
REVOKE ALL ON SCHEMA pgbridge FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgbridge FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgbridge FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgbridge FROM PUBLIC;

INSERT INTO pgbridge.migrations (version, name) VALUES (2, '002_ticks')
ON CONFLICT (version) DO NOTHING;

COMMIT;
