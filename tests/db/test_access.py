"""Who sees what: collections claims, tenant isolation, row filters, hidden columns, token forms."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import asyncpg
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pgbridge import changelog
from pgbridge.auth import TokenPolicy
from pgbridge.events import event_id
from tests.helpers import (
    SECRET,
    Ledger,
    RunningBridge,
    assert_silent,
    close_frame,
    collect,
    fresh_name,
    recv,
    send,
    subscribe,
    token,
    until_quiet,
    wait_for,
)

if TYPE_CHECKING:
    from tests.conftest import Bridges


async def test_collections_claim_limits_subscriptions(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE notes (id int); SELECT pgbridge.publish('notes')")
    await wait_for(lambda: "notes" in (bridge.bridge.publications or ()), what="the bridge to learn of notes")
    async with bridge.connect(token(collections=["notes"])) as ws:
        await send(ws, {"action": "subscribe", "collection": "posts"})
        assert await recv(ws) == {
            "error": "Collection 'posts' is not published or not allowed for this token",
            "action": "subscribe",
            "collection": "posts",
        }
        await subscribe(ws, "notes")
    async with bridge.connect(token(collections={"posts": ["delete"]})) as ws:
        await send(ws, {"action": "subscribe", "collection": "posts", "operations": ["create"]})
        assert (await recv(ws))["error"] == "This token may not receive create on 'posts'"
        await subscribe(ws, "posts")  # no operations named: the allowed ones
        await db.execute("INSERT INTO posts (title) VALUES ('x'); DELETE FROM posts")
        assert (await recv(ws))["type"] == "posts.delete"
        await assert_silent(ws, 0.3)


@pytest.mark.parametrize(("setting", "subscribed"), [("none", False), ("all", True)])
async def test_tokens_without_the_claim_follow_the_server_setting(
    dsn: str, posts: str, setting: str, subscribed: bool, start_bridge: Bridges
) -> None:
    unscoped = token()
    unscoped = jwt.encode(
        {k: v for k, v in jwt.decode(unscoped, options={"verify_signature": False}).items() if k != "collections"},
        "test-secret-with-enough-bytes-for-hs256!",
        algorithm="HS256",
    )
    running = await start_bridge(dsn, unscoped_tokens=setting)
    async with running.connect(unscoped) as ws:
        await send(ws, {"action": "subscribe", "collection": "posts"})
        reply = await recv(ws)
    if subscribed:  # from where the bridge is: nothing was written meanwhile
        position = event_id(running.bridge.listener.head)
        assert reply == {"status": "subscribed", "type": "subscribed", "collection": "posts", "id": position}
    else:
        assert reply == {
            "error": "Collection 'posts' is not published or not allowed for this token",
            "action": "subscribe",
            "collection": "posts",
        }


async def test_tenants_see_only_their_rows_and_rows_moving_between_them(
    dsn: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    await db.execute(
        """CREATE TABLE docs (id int PRIMARY KEY, account_id int, body text);
           SELECT pgbridge.publish('docs')"""
    )
    running = await start_bridge(dsn, tenant_claim="account_id", tenant_column="account_id")
    async with (
        running.connect(token(account_id=1)) as one,
        running.connect(token(account_id=2)) as two,
    ):
        await subscribe(one, "docs")
        await subscribe(two, "docs")
        await db.execute(
            """INSERT INTO docs VALUES (1, 1, 'one-a'), (2, 2, 'two-a'), (3, 1, 'one-b'), (4, 3, 'three');
               UPDATE docs SET body = body || '!' WHERE id IN (1, 2, 4);
               UPDATE docs SET account_id = 2, body = 'moved' WHERE id = 3;
               DELETE FROM docs WHERE id = 1;"""
        )
        got_one = await collect(one, 5)
        got_two = await collect(two, 3)
        await assert_silent(one, 0.3)
        await assert_silent(two, 0.3)
    assert [(e["type"], e["data"]["id"]) for e in got_one] == [
        ("docs.create", 1),
        ("docs.create", 3),
        ("docs.update", 1),
        ("docs.delete", 3),  # moved away: seen as leaving, with the row as this tenant knew it
        ("docs.delete", 1),
    ]
    assert got_one[3]["data"]["body"] == "one-b"
    assert [(e["type"], e["data"]["id"]) for e in got_two] == [
        ("docs.create", 2),
        ("docs.update", 2),
        ("docs.create", 3),  # moved in: seen as arriving, without the old tenant's version
    ]
    assert got_two[2]["data"]["body"] == "moved" and "old" not in got_two[2]
    for tenant, frames in ((1, got_one), (2, got_two)):
        for frame in frames:
            assert frame["data"]["account_id"] == tenant
            assert frame.get("old", frame["data"])["account_id"] == tenant
    assert "three" not in str(got_one + got_two)


async def test_a_token_without_the_tenant_claim_is_refused(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn, tenant_claim="account_id", tenant_column="account_id")
    async with running.connect(token()) as ws:
        assert await close_frame(ws) == (1008, "Token lacks the account_id claim")


async def test_filters_select_rows_and_see_rows_leave(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    async with bridge.connect() as mine, bridge.connect() as also_mine, bridge.connect() as popular:
        flt = {"author_id": 42, "status": {"in": ["draft", "published"]}}
        await subscribe(mine, "posts", filter=flt)
        await subscribe(also_mine, "posts", filter=flt)
        await subscribe(popular, "posts", filter={"title": {"gte": "m"}, "status": {"neq": None}})
        await db.execute(
            """INSERT INTO posts (id, title, author_id, status) VALUES
                 (1, 'a', 42, 'draft'), (2, 'z', 42, 'archived'), (3, 'q', 7, 'published');
               UPDATE posts SET status = 'archived' WHERE id = 1;
               DELETE FROM posts WHERE id = 2;"""
        )
        got = await collect(mine, 2)
        assert [(e["type"], e["data"]["id"]) for e in got] == [("posts.create", 1), ("posts.update", 1)]
        assert got[1]["old"]["status"] == "draft" and got[1]["data"]["status"] == "archived"
        assert await collect(also_mine, 2) == got
        got = await collect(popular, 3)
        assert [(e["type"], e["data"]["id"]) for e in got] == [
            ("posts.create", 2),
            ("posts.create", 3),
            ("posts.delete", 2),
        ]
        for ws in (mine, also_mine, popular):
            await assert_silent(ws, 0.3)


async def test_a_filter_on_a_hidden_column_never_matches(bridge: RunningBridge, db: asyncpg.Connection) -> None:
    async with bridge.connect() as ws:
        await subscribe(ws, "posts", filter={"secret": {"neq": "x"}})
        await subscribe(ws, "posts", filter={"secret": None})
        await db.execute("INSERT INTO posts (title, secret) VALUES ('a', 'y'), ('b', NULL)")
        await assert_silent(ws, 0.5)


@pytest.mark.parametrize(
    ("flt", "error"),
    [
        ([1], "Invalid filter: must be an object mapping column names to conditions"),
        ({"a": [1, 2]}, "Invalid filter: a must be a value or an object of operators"),
        ({"a": {}}, "Invalid filter: a has no operator"),
        ({"a": {"in": []}}, "Invalid filter: a.in expects a list of 1 to 100 values"),
        ({"a": {"in": 5}}, "Invalid filter: a.in expects a list of 1 to 100 values"),
        ({"a": {"lt": None}}, "Invalid filter: a.lt expects a string, number or boolean"),
        ({"a": {"eq": {"x": 1}}}, "Invalid filter: a.eq expects a string, number, boolean or null"),
    ],
)
async def test_malformed_filters_are_named(bridge: RunningBridge, flt: Any, error: str) -> None:
    async with bridge.connect() as ws:
        await send(ws, {"action": "subscribe", "collection": "posts", "filter": flt})
        assert (await recv(ws))["error"] == error


async def test_bearer_subprotocol_carries_the_token(bridge: RunningBridge) -> None:
    async with websockets.connect(bridge.url(), subprotocols=["bearer", token()]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "bearer"
        await subscribe(ws, "posts")
    async with websockets.connect(bridge.url(), subprotocols=["bearer", "not-a-jwt"]) as ws:  # type: ignore[list-item]
        assert (await close_frame(ws))[1] == "Authentication failed"


def _claims(**claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + 600, "collections": "*", **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({}, "Token has no subject: it needs a sub claim"),
        ({"sub": ""}, "Token has an invalid subject: sub must be a non-empty string"),
        ({"sub": "  "}, "Token has an invalid subject: sub must be a non-empty string"),
        ({"sub": 42}, "Token has an invalid subject: sub must be a non-empty string"),
    ],
)
async def test_tokens_must_name_their_subject(bridge: RunningBridge, claims: dict[str, Any], reason: str) -> None:
    async with bridge.connect(_claims(**claims)) as ws:
        assert await close_frame(ws) == (1008, reason)


async def test_tokens_without_a_subject_can_each_count_as_one(dsn: str, posts: str, start_bridge: Bridges) -> None:
    """Once they shared one bucket: a hundred connections of one such token locked out every other."""
    running = await start_bridge(dsn, subjectless_tokens="per-token", max_connections_per_subject=1)
    first, second = _claims(jti="a"), _claims(jti="b")
    async with running.connect(first) as one, running.connect(second) as two:
        await subscribe(one, "posts")
        await subscribe(two, "posts")
        async with running.connect(first) as again:
            assert await close_frame(again) == (1008, "Too many connections for this token")
    async with running.connect(_claims(sub="")) as blank:  # blank is not absent: still refused
        assert await close_frame(blank) == (1008, "Token has an invalid subject: sub must be a non-empty string")


async def test_the_query_and_the_subprotocol_must_carry_the_same_token(bridge: RunningBridge) -> None:
    mine, other = token(), token(sub="someone else")
    async with websockets.connect(bridge.url(mine), subprotocols=["bearer", other]) as ws:  # type: ignore[list-item]
        assert await close_frame(ws) == (1008, "Conflicting tokens: the query and the subprotocol carry different ones")
    async with websockets.connect(bridge.url(mine), subprotocols=["bearer", mine]) as ws:  # type: ignore[list-item]
        await subscribe(ws, "posts")
    assert bridge.bridge.closed["Conflicting tokens"] == 1


def _pem(key: Any) -> bytes:
    public = key.public_key()
    pem: bytes = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
async def test_public_key_tokens_and_algorithm_confusion(
    dsn: str, posts: str, kind: str, start_bridge: Bridges
) -> None:
    private = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    public_pem = _pem(private)
    policy = TokenPolicy.from_settings(secret=None, public_key_pem=public_pem, audience="app", issuer="auth")
    running = await start_bridge(dsn, policy=policy)
    now = int(time.time())
    good = {"sub": "u", "exp": now + 60, "aud": "app", "iss": "auth", "collections": "*"}
    async with running.connect(jwt.encode(good, private, algorithm=kind)) as ws:
        await subscribe(ws, "posts")
    bad_tokens = [
        jwt.encode({**good, "aud": "other"}, private, algorithm=kind),
        jwt.encode({**good, "iss": "mallory"}, private, algorithm=kind),
        jwt.encode({k: v for k, v in good.items() if k != "aud"}, private, algorithm=kind),
        # algorithm confusion: HS256 "signed" with the public key as the secret
        _hs256_with_public_key(good, public_pem),
    ]
    for bad in bad_tokens:
        async with running.connect(bad) as ws:
            assert await close_frame(ws) == (1008, "Authentication failed")


def _hs256_with_public_key(claims: dict[str, Any], public_pem: bytes) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


async def test_leeway_tolerates_clock_skew(dsn: str, posts: str, start_bridge: Bridges) -> None:
    running = await start_bridge(dsn, jwt_leeway=30)
    async with running.connect(token(ttl=-5)) as ws:
        await subscribe(ws, "posts")


async def test_a_token_expired_within_the_leeway_is_closed_once_the_leeway_passes(
    dsn: str, posts: str, start_bridge: Bridges
) -> None:
    leeway = 3
    running = await start_bridge(dsn, jwt_leeway=leeway)
    tok = token(ttl=-1)
    exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
    async with running.connect(tok) as ws:
        await subscribe(ws, "posts")  # expired a second or two ago: within the leeway
        # Until exp + leeway passes, the connection stays open and serving (the watchdog looks every second).
        await asyncio.sleep(exp + leeway - 1 - time.time())  # the time passing is what is tested
        await send(ws, {"action": "ping"})
        assert (await recv(ws))["type"] == "pong"
        assert time.time() < exp + leeway, "the test was too slow to see the connection open within the leeway"
        # Then it is closed as any expired token's: within a round of the watchdog, and not before.
        assert await close_frame(ws, timeout=exp + leeway + 2 - time.time()) == (1008, "Token expired")
        assert time.time() >= exp + leeway


async def test_only_pgbridge_can_attach_its_capture_to_a_table(dsn: str, db: asyncpg.Connection) -> None:
    """A role that owns a table cannot attach pgbridge's capture to it to forge changes of a collection."""
    role = fresh_name("owner")  # roles are the cluster's: one name per test
    await db.execute(f"CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role}")
    owner = await asyncpg.connect(dsn.replace("postgres:@", f"{role}:@"))
    try:
        await owner.execute("CREATE TABLE mine (title text)")
        for function in ("pgbridge.capture_v2('posts', 'true', '{}', '{}')", "pgbridge.capture()"):
            with pytest.raises((asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedFunctionError)):
                await owner.execute(
                    "CREATE TRIGGER forge AFTER INSERT ON mine REFERENCING NEW TABLE AS pgbridge_new "
                    f"FOR EACH STATEMENT EXECUTE FUNCTION {function}"
                )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await owner.execute("SELECT pgbridge.publish('mine', collection => 'posts2')")
    finally:
        await owner.close()


async def test_an_untrusted_role_cannot_read_forge_replay_or_stall_changes(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    """A role that may write to a published table but not read it: LISTEN gives it nothing, and nothing it
    sends or holds changes what a subscriber receives."""
    role = fresh_name("mallory")  # roles are the cluster's: one name per test
    await db.execute(f"CREATE ROLE {role} LOGIN; GRANT INSERT, UPDATE ON posts TO {role}; "
                     f"GRANT USAGE ON SEQUENCE posts_id_seq TO {role}")  # fmt: skip
    running = await start_bridge(dsn, probe_interval=0.5)
    mallory = await asyncpg.connect(dsn.replace("postgres:@", f"{role}:@"))
    heard: list[str] = []
    await mallory.add_listener("pgbridge", lambda *args: heard.append(args[3]))
    try:
        for probe in (
            "SELECT * FROM pgbridge.changes",
            "SELECT * FROM pgbridge.ticks",
            "SELECT pgbridge.tick_v2()",
            "SELECT * FROM posts",
            "DELETE FROM pgbridge.ticks",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await mallory.execute(probe)
        # every lock key pgbridge ever used, and then some, held for the whole test
        await mallory.execute(
            "SELECT pg_advisory_lock(k) FROM generate_series(7316021946250125300, 7316021946250125320) k"
        )
        await mallory.execute("SELECT set_config('pgbridge.sequenced_xid', pg_current_xact_id()::text, false)")
        reconnects = running.bridge.listener.reconnects
        ledger = Ledger()
        async with running.connect() as ws:
            await subscribe(ws, "posts")
            for i in range(20):
                await db.execute("INSERT INTO posts (title, secret) VALUES ($1, 'ssn-123-45-6789')", f"real {i}")
                await mallory.execute("INSERT INTO posts (title, secret) VALUES ($1, 'x')", f"mallory {i}")
                forged = (
                    '{"id": 9223372036854775808, "c": "posts", "op": "create", "ts": "x", "n": 1}\n{"title": "forged"}'
                )
                await mallory.execute(
                    "SELECT pg_notify('pgbridge', $1), pg_notify('pgbridge', 'garbage'), pg_notify('pgbridge', '2'),"
                    " pg_notify('pgbridge_publications', 'posts')",
                    forged,
                )
            await mallory.execute("SELECT pg_notify('pgbridge', g::text) FROM generate_series(1, 2000) g")
            await db.execute("INSERT INTO posts (title) VALUES ('last')")
            ledger.add(await until_quiet(ws))
        await ledger.verify(db, "posts")
        assert len(ledger.received) == 41
        assert {e["data"]["title"] for e in ledger.received} >= {"real 0", "mallory 19", "last"}
        assert all("secret" not in e["data"] for e in ledger.received)
        assert running.bridge.listener.reconnects == reconnects  # nothing made the listener start over
        # the last notification mallory sent: once it has arrived, so has every one sent before it
        await wait_for(lambda: "2000" in heard, what="mallory's own notifications to reach it")
        assert heard and set(heard) <= {"2", "garbage"} | {str(g) for g in range(1, 2001)} | {forged}
        assert not any("ssn" in h or "real" in h for h in heard)  # LISTEN carries no row data
    finally:
        await mallory.close()


async def test_a_bridge_can_run_as_a_role_of_its_own(
    dsn: str, posts: str, db: asyncpg.Connection, start_bridge: Bridges
) -> None:
    role = fresh_name("bridge")  # roles are the cluster's: one name per test
    await db.execute(f"CREATE ROLE {role} LOGIN; SELECT pgbridge.grant_bridge('{role}')")
    as_role = dsn.replace("postgres:@", f"{role}:@")
    running = await start_bridge(as_role)
    async with running.connect() as ws:
        await subscribe(ws, "posts")
        await db.execute("INSERT INTO posts (title, secret) VALUES ('via its own role', 'x')")
        assert (await recv(ws))["data"]["title"] == "via its own role"
    assert running.bridge.listener.ticking  # it may take the ticker lease
    await running.stop()  # its pruner would hold the prune lease now and then
    conn = await asyncpg.connect(as_role)
    try:
        await db.execute("INSERT INTO posts (title) VALUES ('more')")
        await changelog.tick(conn)
        assert await changelog.prune(conn, max_age=0, max_transactions=1) >= 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT pgbridge.publish('posts')")  # publishing stays with the owner
    finally:
        await conn.close()
