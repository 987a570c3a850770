-- pgbridge 005: the ticker's relay. Followers of the ticker used to read every tick's batch from the
-- database, one read per follower per tick, so the database's work per change still grew with the
-- number of bridges. Now the ticker serves the pages it routes to them over a connection of their own
-- (pgbridge/relay.py): it records where (`relay`, a ws:// URL) and the secret they must show
-- (`relay_secret`) in its lease, which only bridges may read. A follower without a relay reads from the
-- database as before.
--
-- Apply by hand with `psql -v ON_ERROR_STOP=1 -f sql/005_relay.sql` (after 004), or with
-- `pgbridge migrate`. Safe to apply more than once; refuses to run over a newer schema. Bridges of 0.4
-- keep working over it (they neither serve nor use a relay).

BEGIN;
SET LOCAL client_min_messages = warning;

DO $$
DECLARE
    installed integer;
BEGIN
    IF to_regclass('pgbridge.migrations') IS NOT NULL THEN
        EXECUTE 'SELECT max(version) FROM pgbridge.migrations' INTO installed;
    END IF;
    IF installed IS NULL OR installed < 4 THEN
        RAISE EXCEPTION 'pgbridge migration 004 is not applied'
            USING HINT = 'Apply sql/001_change_log.sql to sql/004_ticker.sql first, or run `pgbridge migrate`.';
    END IF;
    IF installed > 5 THEN
        RAISE EXCEPTION 'pgbridge schema version % is installed; 005 is older and was not applied', installed
            USING HINT = 'Nothing to do: `pgbridge migrate` applies only the migrations a database lacks.';
    END IF;
END
$$;

-- Bridges may already read and update this table (grant_bridge): the relay needs no new privilege.
ALTER TABLE pgbridge.leases ADD COLUMN IF NOT EXISTS relay text, ADD COLUMN IF NOT EXISTS relay_secret text;
COMMENT ON TABLE pgbridge.leases IS
    'prune and flush: row locks, held for one short transaction. ticker: the bridge (holder) that takes '
    'ticks until `until`, the last tick it announced, the advisory lock class (key, secret) it holds '
    'the lock (key, announced + 1) of, which the others wait on, and where it relays its pages to them '
    '(relay, a URL, and relay_secret, which they show).';

INSERT INTO pgbridge.migrations (version, name) VALUES (5, '005_relay')
ON CONFLICT (version) DO NOTHING;

COMMIT;
