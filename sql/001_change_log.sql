-- pgbridge 001: the change log, commit ordering, and table publishing.
--
-- Apply by hand with `psql -v ON_ERROR_STOP=1 -f sql/001_change_log.sql`, or with `pgbridge migrate`.
-- Safe to apply more than once.

BEGIN;
SET LOCAL client_min_messages = warning;

-- Applying this file over a newer schema would put old functions back: refuse instead.
DO $$
DECLARE
    installed integer;
BEGIN
    IF to_regclass('pgbridge.migrations') IS NOT NULL THEN
        EXECUTE 'SELECT max(version) FROM pgbridge.migrations' INTO installed;
        IF installed > 1 THEN
            RAISE EXCEPTION 'pgbridge schema version % is installed; 001 is older and was not applied', installed
                USING HINT = 'Nothing to do: `pgbridge migrate` applies only the migrations a database lacks.';
        END IF;
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS pgbridge;

CREATE TABLE IF NOT EXISTS pgbridge.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per published table: the only source of its collection name and excluded columns, so a
-- capture trigger attached by hand to any other table captures nothing.
CREATE TABLE IF NOT EXISTS pgbridge.publications (
    relid      regclass PRIMARY KEY,
    collection text NOT NULL UNIQUE,
    excluded   text[] NOT NULL DEFAULT '{}'
);

-- One row per chunk of a statement's changed rows (at most 1000 rows or about 1 MB).
-- body holds one JSON row per line; for an update, the new row's line is followed by the old row's.
-- id is allocated when the row is written, which is not commit order: see pgbridge.commits.
CREATE TABLE IF NOT EXISTS pgbridge.changes (
    id         bigserial PRIMARY KEY,
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    collection text NOT NULL,
    op         text NOT NULL CHECK (op IN ('create', 'update', 'delete')),
    changed_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    nrows      integer NOT NULL,
    body       text NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_xid_idx ON pgbridge.changes (xid, id);

-- One row per committed transaction that changed a published table. seq is taken at commit time
-- while holding a transaction-level advisory lock that is released only after the commit is visible,
-- so seq order is commit order, and it is also the order in which NOTIFY delivers. A change's
-- position is (seq, changes.id); that order survives restarts and is the same on every replica.
CREATE SEQUENCE IF NOT EXISTS pgbridge.commit_seq;
CREATE TABLE IF NOT EXISTS pgbridge.commits (
    seq          bigint PRIMARY KEY,
    xid          xid8 NOT NULL UNIQUE,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE OR REPLACE FUNCTION pgbridge.iso(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;

-- Writes one chunk to the log and announces it. A NOTIFY payload must stay under 8000 bytes, so a
-- larger chunk is announced by reference ("ref": true) and the listener reads the body back.
CREATE OR REPLACE FUNCTION pgbridge.emit(p_collection text, p_op text, p_nrows integer, p_body text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgbridge
AS $$
DECLARE
    change_id bigint;
    header    text;
BEGIN
    INSERT INTO pgbridge.changes (collection, op, nrows, body)
    VALUES (p_collection, p_op, p_nrows, p_body)
    RETURNING id INTO change_id;
    header := json_build_object('id', change_id, 'c', p_collection, 'op', p_op,
                                'ts', pgbridge.iso(statement_timestamp()), 'n', p_nrows)::text;
    IF octet_length(header) + 1 + octet_length(p_body) < 8000 THEN
        PERFORM pg_notify('pgbridge', header || E'\n' || p_body);
    ELSE
        PERFORM pg_notify('pgbridge', json_build_object('id', change_id, 'c', p_collection, 'op', p_op,
                                                        'ts', pgbridge.iso(statement_timestamp()),
                                                        'n', p_nrows, 'ref', true)::text);
    END IF;
END
$$;

-- Statement-level capture of the table's publication.
-- An UPDATE's OLD and NEW transition tables are filled in lockstep, one pair per updated row, so the
-- n-th old row is the n-th new row: that pairs rows whose key changed and tables without a key.
CREATE OR REPLACE FUNCTION pgbridge.capture() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgbridge
AS $$
DECLARE
    max_rows  CONSTANT integer := 1000;
    max_bytes CONSTANT integer := 1048576;
    coll      text;
    excl      text[];
    op        text := CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'update' ELSE 'delete' END;
    lines     text[] := '{}';
    n         integer := 0;
    bytes     bigint := 0;
    line      text;
    rows      refcursor;
BEGIN
    SELECT p.collection, p.excluded INTO coll, excl FROM pgbridge.publications p WHERE p.relid = TG_RELID;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        OPEN rows FOR SELECT (to_jsonb(t) - excl)::text FROM pgbridge_new t;
    ELSIF TG_OP = 'DELETE' THEN
        OPEN rows FOR SELECT (to_jsonb(t) - excl)::text FROM pgbridge_old t;
    ELSE
        OPEN rows FOR
            SELECT (to_jsonb(nw.t) - excl)::text || E'\n' || (to_jsonb(od.t) - excl)::text
            FROM (SELECT row_number() OVER () AS i, t FROM pgbridge_new t) nw
            JOIN (SELECT row_number() OVER () AS i, t FROM pgbridge_old t) od USING (i)
            ORDER BY i;
    END IF;
    LOOP
        FETCH rows INTO line;
        EXIT WHEN NOT FOUND;
        lines := lines || line;
        n := n + 1;
        bytes := bytes + octet_length(line);
        IF n >= max_rows OR bytes >= max_bytes THEN
            PERFORM pgbridge.emit(coll, op, n, array_to_string(lines, E'\n'));
            lines := '{}';
            n := 0;
            bytes := 0;
        END IF;
    END LOOP;
    CLOSE rows;
    IF n > 0 THEN
        PERFORM pgbridge.emit(coll, op, n, array_to_string(lines, E'\n'));
    END IF;
    RETURN NULL;
END
$$;

-- Runs at commit (deferred), once per change-log row; the first one in a transaction takes the
-- commit-order lock and a sequence number. The lock is released after the commit becomes visible.
CREATE OR REPLACE FUNCTION pgbridge.sequence_commit() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgbridge
AS $$
DECLARE
    me text := pg_current_xact_id()::text;
BEGIN
    IF current_setting('pgbridge.sequenced_xid', true) IS DISTINCT FROM me THEN
        PERFORM pg_advisory_xact_lock(7316021946250125309);
        INSERT INTO pgbridge.commits (seq, xid) VALUES (nextval('pgbridge.commit_seq'), pg_current_xact_id());
        PERFORM set_config('pgbridge.sequenced_xid', me, true);
    END IF;
    RETURN NULL;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'pgbridge.changes'::regclass AND tgname = 'pgbridge_sequence_commit') THEN
        CREATE CONSTRAINT TRIGGER pgbridge_sequence_commit
            AFTER INSERT ON pgbridge.changes
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION pgbridge.sequence_commit();
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgbridge.publish(
    tbl regclass, exclude text[] DEFAULT '{}', collection text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pgbridge
AS $$
DECLARE
    coll    text := coalesce(collection, (SELECT relname FROM pg_class WHERE oid = tbl));
    kind    "char" := (SELECT relkind FROM pg_class WHERE oid = tbl);
    missing text;
    holder  regclass;
BEGIN
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cannot publish %: only tables can be published', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF coll !~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'invalid collection name "%"', coll
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use letters, digits and underscores, or pass collection => ''name''.';
    END IF;
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

    INSERT INTO pgbridge.publications (relid, collection, excluded) VALUES (tbl, coll, exclude);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS pgbridge_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture()', tbl);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS pgbridge_old NEW TABLE AS pgbridge_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture()', tbl);
    EXECUTE format('CREATE TRIGGER pgbridge_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS pgbridge_old FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgbridge.capture()', tbl);
    PERFORM pg_notify('pgbridge_publications', coll);
    RETURN coll;
END
$$;

CREATE OR REPLACE FUNCTION pgbridge.unpublish(tbl regclass) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pgbridge
AS $$
DECLARE
    coll text;
BEGIN
    DELETE FROM pgbridge.publications p WHERE p.relid = tbl RETURNING p.collection INTO coll;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not published', tbl USING ERRCODE = 'undefined_object';
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_insert ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_update ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgbridge_capture_delete ON %s', tbl);
    PERFORM pg_notify('pgbridge_publications', coll);
    RETURN coll;
END
$$;

INSERT INTO pgbridge.migrations (version, name) VALUES (1, '001_change_log')
ON CONFLICT (version) DO NOTHING;

COMMIT;
