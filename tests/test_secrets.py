"""No configured secret reaches output, logs or the state DB: one redaction at every boundary."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url

from sync.cli import cli
from sync.config import parse_config
from sync.errors import ConfigError
from tests.harness import WRITE_KEY, Harness
from tests.receiver import Receiver, Scripted

TOKEN = "tok_bearer_SECRET_55"
HOOK_SECRET = "whsec_hook_SECRET_66"
SEGMENT_USER = "segusertoken_SECRET_77"
SEGMENT_PASSWORD = "segpass_SECRET_88"
HOOK_USER = "hookuser_SECRET_99"
HOOK_PASSWORD = "hookpw_SECRET_11"
# An unencoded "@" in a password: parsers split it at the first "@"; its tail must not leak.
SOURCE_PASSWORD = "srcpw_SECRET@TAILSECRET"
STATE_PASSWORD = "statepw_SECRET_22"
# A token read from the environment into the webhook URL's path.
HOOK_PATH_TOKEN = "hookpath_SECRET_33"
BASIC_WRITE_KEY = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
# The Authorization header httpx sends for the webhook URL's userinfo.
BASIC_HOOK = base64.b64encode(f"{HOOK_USER}:{HOOK_PASSWORD}".encode()).decode()
SECRETS = [
    WRITE_KEY,
    BASIC_WRITE_KEY,
    TOKEN,
    HOOK_SECRET,
    SEGMENT_USER,
    SEGMENT_PASSWORD,
    HOOK_USER,
    HOOK_PASSWORD,
    SOURCE_PASSWORD,
    STATE_PASSWORD,
    HOOK_PATH_TOKEN,
    BASIC_HOOK,
    "SECRET",  # every secret above carries it: no fragment or tail may leak either
]
ENV = {
    "TEST_WRITE_KEY": WRITE_KEY,
    "TEST_TOKEN": TOKEN,
    "TEST_HOOK_SECRET": HOOK_SECRET,
    "TEST_HOOK_PATH": HOOK_PATH_TOKEN,
}


def assert_no_secret(where: str, output: str) -> None:
    for secret in SECRETS:
        assert secret not in output, f"{secret!r} leaked into {where}:\n{output}"


def dump_state(engine: Engine) -> str:
    """Every row of every table, as text."""
    with engine.connect() as connection:
        tables = inspect(connection).get_table_names()
        return "\n".join(
            f"{table}: {connection.execute(text(f'SELECT * FROM {table}')).all()}"
            for table in tables
        )


def echo_body() -> str:
    """A destination answer that echoes the credentials it was sent."""
    return json.dumps(
        {
            "error": f"invalid write key {WRITE_KEY} (Basic {BASIC_WRITE_KEY})",
            "auth": TOKEN,
            "request": f"POST /hook/{HOOK_PATH_TOKEN} Authorization: Basic {BASIC_HOOK}",
        }
    )


def leaky_config(harness: Harness, receiver: Receiver) -> Path:
    host = receiver.url.removeprefix("http://")
    harness.destinations["segment"]["write_key"] = "${TEST_WRITE_KEY}"
    harness.destinations["segment"]["endpoint"] = f"http://{SEGMENT_USER}:{SEGMENT_PASSWORD}@{host}"
    harness.destinations["hook"] = {
        "type": "webhook",
        "url": f"http://{HOOK_USER}:{HOOK_PASSWORD}@{host}/hook/${{TEST_HOOK_PATH}}",
        "secret": "${TEST_HOOK_SECRET}",
        "headers": {"Authorization": "Bearer ${TEST_TOKEN}"},
        "timeout": 2,
    }
    harness.audience["destinations"] = ["segment", "hook"]
    harness.config_extra = f"""
[sources.remote]
url = "postgresql+psycopg://reader:{SOURCE_PASSWORD}@127.0.0.1:1/warehouse"

[[audiences]]
name = "Remote"
source = "remote"
query = "SELECT user_id FROM t"
destinations = ["segment"]
"""
    path = harness.write_config()
    state = make_url(harness.engine.url.render_as_string(hide_password=False))
    if state.get_backend_name() == "postgresql":
        # Trust authentication accepts any password: put one in the state URL.
        with_password = state.set(password=STATE_PASSWORD).render_as_string(hide_password=False)
        original = harness.engine.url.render_as_string(hide_password=False)
        path.write_text(path.read_text().replace(original, with_password))
    return path


def test_no_secret_reaches_output_logs_or_the_state_db(
    harness: Harness, receiver: Receiver
) -> None:
    path = leaky_config(harness, receiver)
    harness.set_members(["a", "b"])
    runner = CliRunner(env=ENV)

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["--config", str(path), "--log-level", "DEBUG", *args])
        assert "Traceback" not in result.output, result.output
        assert_no_secret(" ".join(args), result.output)
        return result.output

    # Segment: the batch and then member "a" are refused with the write key echoed; the hook
    # answers 404 echoing it too (its error names the URL, userinfo included).
    script = [Scripted(400, echo_body()), Scripted(400, echo_body()), Scripted(200)]
    receiver.script = [*script, Scripted(404, echo_body())]
    output = run("sync", "--json")
    reports = {r["key"]: r for r in json.loads(output[output.index("[\n") :])}
    assert reports["high_value_users"]["status"] == "failed"
    assert reports["remote"]["status"] == "failed"
    receiver.script = [*script, Scripted(404, echo_body())]
    run("sync", "--full")
    for command in (
        ["runs"],
        ["runs", "--json"],
        ["status"],
        ["status", "--json"],
        ["members", "High Value Users"],
        ["members", "High Value Users", "--json"],
        ["members", "High Value Users", "--destination", "hook", "--json"],
        ["user", "a"],
        ["user", "a", "--json"],
        ["check"],
        ["check", "--json"],
    ):
        run(*command)
    # The failures really were recorded, redacted (not dropped).
    state = dump_state(harness.engine)
    assert "HTTP 404" in state and "HTTP 400" in state and "***" in state
    assert_no_secret("the state database", state)


def test_the_redactor_hides_url_userinfo_even_when_malformed() -> None:
    from sync.redaction import Redactor

    redactor = Redactor()
    assert (
        redactor.redact("postgresql://u:pw@TAIL@db:5432/x failed")
        == "postgresql://u:***@db:5432/x failed"
    )
    # In an HTTP URL the user name is a credential too (tokens travel as user names).
    assert redactor.redact("POST https://tok_abc@hooks.example/x") == (
        "POST https://***@hooks.example/x"
    )
    assert redactor.redact("see https://example.com/?email=a@b.co") == (
        "see https://example.com/?email=a@b.co"
    )


def test_the_redactor_hides_encoded_forms_of_secrets() -> None:
    from sync.redaction import Redactor

    secret = 'wk/"quoted"+1'
    redactor = Redactor([secret])
    for form in (secret, json.dumps(secret)[1:-1], "wk%2F%22quoted%22%2B1"):
        assert redactor.redact(f"echo: {form}!") == "echo: ***!"


def parse(text_: str, environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text_, "test.toml", Path("/tmp"), environ)
    return caught.value.problems


BASE = """
[sources.w]
url = "sqlite:///w.db"
[[audiences]]
name = "A"
source = "w"
query = "SELECT user_id FROM t"
destinations = ["s"]
"""


def test_config_errors_never_echo_secrets() -> None:
    environ = {"WK": "WKsecret123", "DB": "postgres//u:dbSECRETpw@host/x"}
    problems = parse(
        BASE
        + """
[destinations.s]
type = "segment"
write_key = "${WK}"
batch_size = "${WK}"
timeout = "${WK}"
[sources.bad]
url = "${DB}"
[destinations.h]
type = "webhook"
url = "https://h.example/x"
secret = 12345678
""",
        environ,
    )
    joined = "\n".join(problems)
    assert "destinations.s.batch_size" in joined and "${WK}" in joined
    assert "sources.bad.url" in joined and "destinations.h.secret" in joined
    for secret in ("WKsecret123", "dbSECRETpw", "12345678"):
        assert secret not in joined, joined


def test_a_plain_user_name_beside_a_password_is_not_hidden() -> None:
    """`http://user:pw@…` hid every "user" in the output (`user_00003` became `***_00003`;
    hostile review); the password and the Basic header still go."""
    from sync.redaction import Redactor, url_secrets

    found = url_secrets("http://user:pw_SECRET_1@127.0.0.1:9/x")
    redactor = Redactor(found)
    assert "user" not in found
    shown = redactor.redact("member user_00003 via http://user:pw_SECRET_1@h")
    assert shown.startswith("member user_00003 via http://") and "pw_SECRET_1" not in shown


QUERY_TOKEN = "qtok_SECRET_44"


@pytest.mark.parametrize("from_env", [True, False], ids=["endpoint_from_env", "literal_endpoint"])
def test_a_token_in_an_endpoints_query_string_never_shows(
    harness: Harness, receiver: Receiver, from_env: bool
) -> None:
    """The URL sent is the endpoint with `/v1/batch` put before its query: an endpoint read
    from the environment (a secret whole) must stay hidden in that form too, and a
    credential-like query parameter typed into the config is hidden like a password."""
    endpoint = f"{receiver.url}/relay/?tenant=acme&access_token={QUERY_TOKEN}"
    env = {"TEST_ENDPOINT": endpoint} if from_env else {}
    harness.destinations["segment"]["endpoint"] = "${TEST_ENDPOINT}" if from_env else endpoint
    path = harness.write_config()
    harness.set_members(["a"])
    receiver.script = [Scripted(404, "no such page")] * 4
    runner = CliRunner(env=env)
    hidden = [QUERY_TOKEN, "tenant=acme"] if from_env else [QUERY_TOKEN]
    outputs: dict[str, str] = {}
    for command in (["check", "--probe"], ["check", "--probe", "--json"], ["sync"], ["runs"]):
        result = runner.invoke(cli, ["--config", str(path), *command])
        assert "Traceback" not in result.output, result.output
        outputs[" ".join(command)] = result.output
    assert receiver.requests[-1].path.startswith("/relay/v1/batch?tenant=acme&")
    outputs["the state database"] = dump_state(harness.engine)
    assert "404" in outputs["sync"] and "404" in outputs["the state database"], outputs
    for where, output in outputs.items():
        for secret in hidden:
            assert secret not in output, f"{secret!r} leaked into {where}:\n{output}"


def test_credential_query_parameters_are_hidden_as_written_and_nothing_else() -> None:
    """Tokens in a URL's query or fragment are hidden however they are written (``+``,
    lower-case percent escapes, ``;`` separators); ordinary parameters whose names merely
    contain a credential word (``keyword``, ``monkey``) and short values (``auth=none``) are
    not, so they do not mangle unrelated output; an environment URL's path is hidden too
    (a destination echoes the path it was sent to)."""
    from sync.redaction import Redactor, collect_secrets

    url = (
        "http://h.example/p?tenant=acme&access_token=ab+cdTOKPLUS&X-Amz-Signature=ab%2fsiglower"
        ";sessionToken=SEMITOK999&keyword=default&auth=none&monkey=destination"
        "#access_token=FRAGTOK77"
    )
    tree = {"destinations": {"hook": {"type": "webhook", "url": url}}}
    env_url = "http://h.example/hooks/SECRETPATHTOKEN123"
    redactor = Redactor(collect_secrets(tree, [("destinations.seg.url", env_url)]))
    shown = redactor.redact(
        f"POST {url} failed; POST /hooks/SECRETPATHTOKEN123 answered 404 for this destination"
    )
    for secret in ("ab+cdTOKPLUS", "ab%2fsiglower", "SEMITOK999", "FRAGTOK77", "SECRETPATHTOKEN"):
        assert secret not in shown, shown
    for ordinary in ("tenant=acme", "keyword=default", "auth=none", "monkey=destination"):
        assert ordinary in shown, shown
    assert shown.endswith("answered 404 for this destination")


def test_a_variable_read_into_a_query_never_shows(harness: Harness, receiver: Receiver) -> None:
    """A `${VAR}` in an audience's query (a pgcrypto key, a tenant token) reached the run's
    error, the log and `runs` when the source's error quoted the SQL (MariaDB does; SQLite
    names the unknown column). Its value is a secret like a URL's; the rest of the query is
    not hidden."""
    harness.audience["query"] = "SELECT user_id, email FROM members WHERE ${QUERY_TOKEN} = 1"
    path = harness.write_config()
    token = "qTokenHunter2xyz"
    runner = CliRunner(env={"QUERY_TOKEN": token})
    sync = runner.invoke(cli, ["--config", str(path), "sync"])
    assert sync.exit_code == 1, sync.output
    assert "no such column" in sync.output and token not in sync.output, sync.output
    runs = runner.invoke(cli, ["--config", str(path), "runs", "--json"])
    assert "no such column" in runs.output and token not in runs.output, runs.output
    # `show-sql` prints the query with the variable's value hidden, the rest as written.
    shown = runner.invoke(cli, ["--config", str(path), "show-sql", "High Value Users"]).output
    assert "FROM members WHERE *** = 1" in shown, shown
    assert token not in dump_state(harness.engine)


def test_only_credential_like_variables_in_a_query_are_hidden(
    harness: Harness, receiver: Receiver
) -> None:
    """`${TABLE}` = members in a query hid "members" in every output (`pro_***` for a key
    containing it, `1 ***` in the log, show-sql of other audiences): a variable in SQL is a
    secret when its name says so (KEY, TOKEN, SECRET, PASSWORD…), as header names do (second
    review)."""
    harness.audience["query"] = "SELECT user_id, email FROM ${TABLE} WHERE ${QUERY_KEY} = 1"
    path = harness.write_config()
    runner = CliRunner(env={"TABLE": "members", "QUERY_KEY": "keyHunter2xyz"})
    sync = runner.invoke(cli, ["--config", str(path), "sync"])
    assert "no such column: ***" in sync.output and "keyHunter2xyz" not in sync.output
    shown = runner.invoke(cli, ["--config", str(path), "show-sql", "High Value Users"]).output
    assert "FROM members WHERE *** = 1" in shown, shown


def test_a_secret_cut_short_in_an_excerpt_is_hidden() -> None:
    """MariaDB quotes 80 characters of the SQL near a syntax error and marks the cut with
    "...": a secret cut there no longer matched whole, and its first part showed (second
    review)."""
    from sync.redaction import Redactor

    secret = "Kq7xZp2mWv9sLr4tYb8nHc3dFg6jQw1eRt5yUi0oPa"
    hide = Redactor([secret])
    excerpt = f"near 'SELEC user_id, AES_DECRYPT(email, '{secret[:18]}...' at line 1"
    assert hide.redact(excerpt) == "near 'SELEC user_id, AES_DECRYPT(email, '***...' at line 1"
    assert hide.redact(f"{secret[:18]}…") == "***…"
    assert hide.redact("Kq7x and more...") == "Kq7x and more..."  # not a cut secret


@pytest.mark.parametrize(
    "name",
    ["PGKEY", "AES_KEY", "API_KEY", "QUERY_TOKEN", "DB_PASS", "PGP_PASSPHRASE", "DB_PW",
     "HMAC_SIGNING", "PEPPER", "JWT", "BEARER", "SIG", "CERT", "DB_PASSWORD", "AUTH", "SALT"],
)
def test_credential_variable_names(name: str) -> None:
    """Names like credentials, as words (third review: PASS, PASSPHRASE, PW, JWT… were missed)."""
    from sync.redaction import is_secret_variable

    assert is_secret_variable(name)


@pytest.mark.parametrize(
    "name",
    ["TABLE", "SCHEMA", "SORT_KEY", "PARTITION_KEY", "ID_KEY", "KEYSPACE", "MONKEY_SCHEMA",
     "AUTHOR_TABLE", "TURKEY", "PASSENGERS"],
)
def test_ordinary_variable_names(name: str) -> None:
    """…and ordinary names are not (SORT_KEY, MONKEY_SCHEMA, AUTHOR_TABLE hid their values in
    every output)."""
    from sync.redaction import is_secret_variable

    assert not is_secret_variable(name)


def test_a_secret_quoted_from_its_middle_or_a_short_start_before_a_cut() -> None:
    """MariaDB's excerpt starts after the token it could not parse: a quote inside the secret
    showed its tail (third review). A cut mark after a few ordinary characters that happen to
    start a secret (a URL's "https") hides nothing."""
    from sync.redaction import Redactor

    hide = Redactor(["Zx'9q-RandomTailSecret77", "https://hooks.slack.com/services/T0/B0/XXSECRET"])
    quoted = "You have an error near '-RandomTailSecret77') IS NOT NULL' at line 1"
    assert hide.redact(quoted) == "You have an error near '***') IS NOT NULL' at line 1"
    assert hide.redact("retrying https... later") == "retrying https... later"
    assert hide.redact("near 'SELECT 1' at line 1") == "near 'SELECT 1' at line 1"


def test_cut_and_quoted_secrets_across_marks_and_their_cost() -> None:
    """A secret holding "..." cut after it showed (only the text since the previous mark was
    looked at); the text after each `near '` was copied whole, quadratic in the marks (fourth
    review)."""
    from sync.redaction import Redactor

    secret = "p4ss...w0rdXYZ12345"
    hide = Redactor([secret])
    assert hide.redact("near 'p4ss...w0rdXY...' at line 1") == "near '***...' at line 1"
    many = "near 'x' " * 20_000
    assert hide.redact(many) == many


@pytest.mark.parametrize("name", ["API_KEYS", "PASSWORDS", "DB_CREDS", "PGPASS", "DBPW",
                                  "USER_ID_HASH_KEY", "GROUP_ENCRYPTION_KEY"])
def test_more_credential_variable_names(name: str) -> None:
    from sync.redaction import is_secret_variable

    assert is_secret_variable(name)


@pytest.mark.parametrize("name", ["TRAIT_KEY", "PASS_THROUGH_SCHEMA", "BYPASS_TABLE"])
def test_more_ordinary_variable_names(name: str) -> None:
    from sync.redaction import is_secret_variable

    assert not is_secret_variable(name)


def test_a_secret_s_part_quoted_by_postgresql_or_sqlite_is_hidden() -> None:
    """PostgreSQL (`at or near "…"`) and SQLite (`near "…"`) quote the token they could not
    parse, and PostgreSQL's LINE excerpt may start with "..." inside a secret: after a quote
    character in a `${…_TOKEN}` value, 11 of its 16 characters showed (hostile review)."""
    from sync.redaction import Redactor

    secret = "Kq7x'Zp2mRwLm9Tt"
    hide = Redactor([secret])
    postgres = (
        'syntax error at or near "Zp2mRwLm9Tt"\n'
        f"LINE 1: SELECT user_id FROM members WHERE org = '{secret}' A...\n"
    )
    assert hide.redact(postgres) == (
        'syntax error at or near "***"\nLINE 1: SELECT user_id FROM members WHERE org = '
        "'***' A...\n"
    )
    assert hide.redact('near "Zp2mRwLm9Tt": syntax error') == 'near "***": syntax error'
    assert hide.redact("LINE 1: ...2mRwLm9Tt' AND x = 1") == "LINE 1: ...***' AND x = 1"
    # Ordinary tokens and excerpts stay.
    assert hide.redact('syntax error at or near "SELECT"') == 'syntax error at or near "SELECT"'
    assert hide.redact("LINE 1: ...members WHERE") == "LINE 1: ...members WHERE"


def test_a_secret_s_middle_quoted_by_sqlite_or_cut_on_both_sides_is_hidden() -> None:
    """SQLite says `unrecognized token: "…"` when a digit follows the quote in a secret; MariaDB
    quotes at most ~80 characters after the token it could not parse and marks the cut, so in
    a long secret its quote starts and ends inside it (second hostile review: the rest of the
    secret, or 77 characters of it, showed)."""
    from sync.redaction import Redactor

    secret = "Kq7x'9Zp2mRwLm9Tt"
    text = 'query failed on source "wh": unrecognized token: "9Zp2mRwLm9Tt"'
    assert Redactor([secret]).redact(text) == 'query failed on source "wh": unrecognized token: "***"'
    tail = "Hq4Lx8Wn2Rt6Yb9Mc3Vd7Kf5Jg1Pz0Sa" * 3
    long_secret = "Kq7xZp2mRw'" + tail
    hide = Redactor([long_secret])
    mariadb = f"to use near '{tail[:77]}...' at line 1"
    assert hide.redact(mariadb) == "to use near '***...' at line 1"
    postgres = f"LINE 1: ...{tail[5:60]}..."
    assert hide.redact(postgres) == "LINE 1: ...***..."
    assert hide.redact("near 'Hq4Lx8 and more' at line 1") == "near 'Hq4Lx8 and more' at line 1"


def test_a_secret_s_tail_in_an_unterminated_string_or_a_quoted_identifier_is_hidden() -> None:
    """A secret holding a quote, read into SQL unquoted: the string it starts runs on into the
    SQL after it, and PostgreSQL and SQLite quote that whole rest as one token; a secret holding
    double quotes is quoted as an identifier, `""…""` (third hostile review: both showed)."""
    import sqlite3

    from sync.redaction import Redactor

    secret = "Kq7x'Zp2mRwLm9TtQv8s"
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE members (user_id TEXT, token TEXT)")
    with pytest.raises(sqlite3.Error) as caught:
        db.execute(f"SELECT user_id FROM members WHERE token = {secret} AND user_id IS NOT NULL")
    hide = Redactor([secret])
    assert "Zp2mRwLm9TtQv8s" not in hide.redact(str(caught.value)), str(caught.value)
    postgres = "unterminated quoted string at or near \"'Zp2mRwLm9TtQv8s AND user_id IS NULL\""
    assert hide.redact(postgres) == (
        "unterminated quoted string at or near \"'*** AND user_id IS NULL\""
    )
    quoted = Redactor(['ab"cdEFGhij"KLMnopQRst'])
    assert quoted.redact('near ""cdEFGhij"": syntax error') == 'near ""***"": syntax error'


EMOJI = "\U0001f600"  # a 4-byte (non-BMP) character: MariaDB's utf8mb3 messages cannot hold it


@pytest.mark.parametrize(
    ("database", "query", "secret", "shown", "reason"),
    [
        # PostgreSQL's invalid input syntax quotes the value as parsed: a doubled quote undoubled.
        pytest.param(
            "postgresql",
            "SELECT user_id FROM members WHERE id = '${SRC_TOKEN}'",
            "Kq7x''Zp2mRwLm9Tt",
            "Kq7x'Zp2mRwLm9Tt",
            "invalid input syntax for type integer",
            id="postgresql-doubled-quote-undoubled",
        ),
        # ... or the secret's start, up to the quote in it that ended the literal.
        pytest.param(
            "postgresql",
            "SELECT user_id FROM members WHERE id IN ('${SRC_TOKEN}')",
            "Kq7xZp2m','Rw9sLm9Tt",
            "Kq7xZp2m",
            "invalid input syntax for type integer",
            id="postgresql-start-before-a-quote",
        ),
        # MariaDB's near '…' excerpt shows a 4-byte character as "?".
        pytest.param(
            "mariadb",
            "SELECT user_id FROM members WHERE x = '${SRC_TOKEN}'",
            f"Zq9x'Kw4p{EMOJI}Lm8rTt2vQ",
            "Kw4p?Lm8rTt2vQ",
            "MySQL error 1064",
            id="mariadb-near-excerpt-question-mark",
        ),
        # MariaDB's error 1300 shows the bytes outside printable ASCII as \xNN escapes...
        pytest.param(
            "mariadb",
            "SELECT user_id FROM members WHERE id = ${SRC_TOKEN}",
            f"Kq7x{EMOJI}Zp2mRw9sVb3n",
            r"Kq7x\xF0\x9F\x98\x80Zp2mRw9sVb3n",
            "MySQL error 1300",
            id="mariadb-1300-byte-escapes",
        ),
        # ... of the secret's start, up to a quote in it.
        pytest.param(
            "mariadb",
            "SELECT user_id FROM members WHERE id = ${SRC_TOKEN}",
            f"Zq9{EMOJI}xW7'Kw4pLm8rTt2vQ",
            r"Zq9\xF0\x9F\x98\x80xW7",
            "MySQL error 1300",
            id="mariadb-1300-start-before-a-quote",
        ),
        # PostgreSQL folds an unquoted identifier to lower case.
        pytest.param(
            "postgresql",
            "SELECT user_id FROM members WHERE members.${SRC_TOKEN} = 1",
            "Kq7xZp2mRw9sVb3n",
            "kq7xzp2mrw9svb3n",
            "does not exist",
            id="postgresql-identifier-folded-to-lower-case",
        ),
    ],
)
def test_a_secret_a_source_database_rewrites_in_its_error_never_shows(
    harness: Harness,
    request: pytest.FixtureRequest,
    database: str,
    query: str,
    secret: str,
    shown: str,
    reason: str,
) -> None:
    """A `${…_TOKEN}` read into a PostgreSQL or MariaDB source's query and quoted back by the
    database's error otherwise than as written (each case says how) showed in the exit line,
    the log, `runs`, the state DB and the alert (review)."""
    from tests.receiver import Receiver

    fixture = "mysql_database_url" if database == "mariadb" else "postgres_schema_url"
    source_url: str = request.getfixturevalue(fixture)
    source = create_engine(source_url)
    try:
        with source.begin() as connection:
            connection.execute(text("CREATE TABLE members (user_id TEXT, id INTEGER, x TEXT)"))
    finally:
        source.dispose()
    harness.source_url = source_url
    harness.audience["query"] = query
    harness.audience.pop("traits")
    with Receiver().running() as alerts:
        harness.config_extra += f'\n[alerts.pager]\ntype = "webhook"\nurl = "{alerts.url}/a"\n'
        path = harness.write_config()
        runner = CliRunner(env={"SRC_TOKEN": secret})
        outputs: dict[str, str] = {}
        for command in (["sync"], ["sync", "--json"], ["runs"], ["runs", "--json"], ["status"]):
            args = ["--config", str(path), "--log-level", "DEBUG", *command]
            outputs[" ".join(command)] = runner.invoke(cli, args).output
        outputs["the alerts"] = json.dumps([r.body for r in alerts.requests], ensure_ascii=False)
    outputs["the state database"] = dump_state(harness.engine)
    assert reason in outputs["sync"], outputs["sync"]  # the database's own error, redacted
    assert reason in outputs["the alerts"] and reason in outputs["the state database"]
    # No 6 characters of the secret in the form the database showed it.
    pieces = {shown[i : i + 6] for i in range(len(shown) - 5)}
    for where, output in outputs.items():
        for piece in pieces:
            assert piece not in output, f"{piece!r} of {shown!r} leaked into {where}:\n{output}"
        assert "***" in output or where == "status", f"{where}:\n{output}"


def test_a_quoted_run_that_is_a_part_of_a_secret_is_hidden_and_ordinary_quotes_are_not() -> None:
    """One rule wherever a text quotes a run: a quoted run that is a part of a secret (6
    characters or more of it), or starts with its end or ends with its start, is hidden, also
    as the database parsed it (a doubled quote undoubled); quoted ordinary words are not
    (review)."""
    from sync.redaction import Redactor

    hide = Redactor(["Kq7x''Zp2m\"\"Rw9sLm"])
    undoubled = 'invalid input syntax for type integer: "Kq7x\'Zp2m""Rw9sLm"'
    assert hide.redact(undoubled) == 'invalid input syntax for type integer: "***"'
    assert hide.redact('for type integer: "Kq7x\'Zp2m"') == 'for type integer: "***"'
    assert hide.redact("for type integer: `Zp2m\"\"Rw9`") == "for type integer: `***`"
    for ordinary in (
        "near 'SELECT user_id FROM members WHERE x = 1' at line 1",
        'audience "High Value Users": query failed on source "warehouse"',
        "Kq7x is not Zp2m's secret",
        "near 'Zp2m' at line 1",
    ):
        assert hide.redact(ordinary) == ordinary


def test_a_4_byte_character_shown_as_a_question_mark_is_seen_through() -> None:
    """MariaDB's near '…' excerpt is in a character set without 4-byte characters: each shows
    as "?", and the rest of a secret after a quote in it showed (review)."""
    from sync.redaction import Redactor

    hide = Redactor([f"Zq9x'Kw4p\u00e9{EMOJI}Lm8r{EMOJI}Tt2vQ"])
    near = "to use near 'Kw4p\u00e9?Lm8r?Tt2vQ'' at line 1"
    assert hide.redact(near) == "to use near '***'' at line 1"
    for ordinary in ("to use near '?' at line 1", "near '????????' at line 1"):
        assert hide.redact(ordinary) == ordinary


def test_bytes_shown_as_escapes_are_decoded_before_looking() -> None:
    """MariaDB's error 1300 shows bytes outside printable ASCII as `\\xNN` escapes, cut short
    after 64 bytes (within a character's bytes, too); Python shows bytes in lower-case hex.
    An escaped character some secret also holds, or a secret's start shorter than 6
    characters, is no secret (review)."""
    from sync.redaction import Redactor

    hide = Redactor([f"Zq9x'Kw4p\u00e9{EMOJI}Lm8r{EMOJI}Tt2vQ", f"Ab{EMOJI}" + "C" * 40])
    escaped = r"Invalid utf8mb4 character string: 'Zq9x'Kw4p\xC3\xA9\xF0\x9F\x98\x80Lm8r' (1300)"
    assert hide.redact(escaped) == "Invalid utf8mb4 character string: '***' (1300)"
    assert hide.redact(r"string: 'Ab\xF0\x9F\x98\x80CCCCCCCC...'") == "string: '***...'"
    assert hide.redact(r"b'Kw4p\xc3\xa9\xf0\x9f\x98\x80Lm\xf0\x9f...'") == "b'***...'"
    for ordinary in (
        r"Invalid utf8mb4 character string: '\xF0\x9F\x98\x80' (1300)",
        r"Invalid utf8mb4 character string: 'Ab\xF0\x9F\x98\x80' (1300)",
        r"C:\x00\xff CCCCCC",
    ):
        assert hide.redact(ordinary) == ordinary


def test_an_identifier_folded_to_lower_case_is_hidden() -> None:
    """PostgreSQL folds an unquoted identifier's letters to lower case: column
    members.kq7xzp2m… does not exist showed a `${…_TOKEN}` read into a query unquoted. Secrets
    shorter than 6 characters are matched as written only."""
    from sync.redaction import Redactor

    hide = Redactor(["Kq7xZp2mRw9sVb3n", "AbCdE"])
    assert hide.redact("column members.kq7xzp2mrw9svb3n does not exist") == (
        "column members.*** does not exist"
    )
    assert hide.redact('column "kq7xzp2mrw9" does not exist') == 'column "***" does not exist'
    assert hide.redact('column "abcde" does not exist') == 'column "abcde" does not exist'
