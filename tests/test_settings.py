"""Settings (section 1): defaults, PREFECT_HOME, precedence env > profile > default, database URL forms,
the database password, PREFECT_API_DATABASE_MIGRATE_ON_START and PREFECT_API_DATABASE_ECHO.

Every subprocess gets a PREFECT_HOME (or, for the default-home tests, a HOME) inside tmp_path."""

import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import Client, ROOT, ServerProcess, clean_env, free_port, run_cli

import prefectlite
from prefectlite import ConfigurationError, load_settings, parse_database_url


def assert_one_line_error(proc):
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# defaults and PREFECT_HOME


def test_default_prefect_home_is_dot_prefectlite_never_dot_prefect():
    settings = load_settings(env={})  # reads ~/.prefectlite/profiles.toml if present, writes nothing
    home = Path(settings["PREFECT_HOME"])
    assert home == Path(os.path.expanduser("~/.prefectlite"))
    assert home.name == ".prefectlite"
    assert home != Path(os.path.expanduser("~/.prefect"))
    assert settings.sources["PREFECT_HOME"] == "default"


def test_default_home_and_database_url_in_a_private_home(tmp_path):
    """With HOME pointing into tmp_path and no PREFECT_* variables: the defaults resolve under ~/.prefectlite."""
    code = (
        "import prefectlite, json; s = prefectlite.load_settings(env={}); "
        "print(json.dumps([s['PREFECT_HOME'], s['PREFECT_API_DATABASE_CONNECTION_URL']]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    home, url = __import__("json").loads(proc.stdout)
    assert home == str(tmp_path / ".prefectlite")
    assert url == f"sqlite:///{tmp_path}/.prefectlite/prefectlite.db"


def test_default_database_file_is_created_under_dot_prefectlite(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "prefectlite.py"), "database", "upgrade", "-y"],
        env=clean_env(HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / ".prefectlite" / "prefectlite.db").is_file()
    assert not (tmp_path / ".prefect").exists()


def test_default_database_url_follows_prefect_home(tmp_path):
    settings = load_settings(env={"PREFECT_HOME": str(tmp_path)})
    url = settings["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url == f"sqlite:///{tmp_path}/prefectlite.db"
    assert settings.sources["PREFECT_API_DATABASE_CONNECTION_URL"] == "default"
    assert parse_database_url(url) == ("sqlite", f"{tmp_path}/prefectlite.db")
    proc = run_cli("database", "upgrade", "-y", env={"PREFECT_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "prefectlite.db").is_file()


def test_spec_default_of_the_database_url():
    assert (
        prefectlite.SETTINGS["PREFECT_API_DATABASE_CONNECTION_URL"].default
        == "sqlite:///${PREFECT_HOME}/prefectlite.db"
    )


def test_prefect_home_in_a_profile_value_is_expanded(tmp_path):
    proc = run_cli(
        "config",
        "set",
        "PREFECT_API_DATABASE_CONNECTION_URL=sqlite:///${PREFECT_HOME}/other.db",
        env={"PREFECT_HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    settings = load_settings(env={"PREFECT_HOME": str(tmp_path)})
    assert settings["PREFECT_API_DATABASE_CONNECTION_URL"] == f"sqlite:///{tmp_path}/other.db"


# ---------------------------------------------------------------------------------------------
# precedence env > active profile > default


def test_precedence_env_over_profile_over_default(tmp_path):
    home = {"PREFECT_HOME": str(tmp_path)}
    assert load_settings(env=home).sources["PREFECT_SERVER_API_PORT"] == "default"
    assert load_settings(env=home)["PREFECT_SERVER_API_PORT"] == 4200

    proc = run_cli("config", "set", "PREFECT_SERVER_API_PORT=4300", env=home)
    assert proc.returncode == 0, proc.stderr
    profiles = tomllib.loads((tmp_path / "profiles.toml").read_text())
    assert str(profiles["profiles"][profiles["active"]]["PREFECT_SERVER_API_PORT"]) == "4300"
    settings = load_settings(env=home)
    assert settings["PREFECT_SERVER_API_PORT"] == 4300
    assert settings.sources["PREFECT_SERVER_API_PORT"] == "profile"

    settings = load_settings(env={**home, "PREFECT_SERVER_API_PORT": "4400"})
    assert settings["PREFECT_SERVER_API_PORT"] == 4400
    assert settings.sources["PREFECT_SERVER_API_PORT"] == "env"

    proc = run_cli("config", "unset", "PREFECT_SERVER_API_PORT", env=home)
    assert proc.returncode == 0, proc.stderr
    settings = load_settings(env=home)
    assert settings["PREFECT_SERVER_API_PORT"] == 4200
    assert settings.sources["PREFECT_SERVER_API_PORT"] == "default"


def test_only_the_active_profile_counts(tmp_path):
    home = {"PREFECT_HOME": str(tmp_path)}
    assert run_cli("config", "set", "PREFECT_API_DEFAULT_LIMIT=50", env=home).returncode == 0
    assert run_cli("profile", "create", "other", env=home).returncode == 0
    assert load_settings(env=home)["PREFECT_API_DEFAULT_LIMIT"] == 50
    assert run_cli("profile", "use", "other", env=home).returncode == 0
    settings = load_settings(env=home)
    assert settings.profile == "other"
    assert settings["PREFECT_API_DEFAULT_LIMIT"] == 200
    assert settings.sources["PREFECT_API_DEFAULT_LIMIT"] == "default"


def test_values_are_converted_to_their_types(tmp_path):
    settings = load_settings(
        env={
            "PREFECT_HOME": str(tmp_path),
            "PREFECT_API_DATABASE_ECHO": "true",
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
            "PREFECT_API_DATABASE_TIMEOUT": "2.5",
            "PREFECT_SERVER_API_PORT": "1234",
        }
    )
    assert settings["PREFECT_API_DATABASE_ECHO"] is True
    assert settings["PREFECT_API_DATABASE_MIGRATE_ON_START"] is False
    assert settings["PREFECT_API_DATABASE_TIMEOUT"] == 2.5
    assert settings["PREFECT_SERVER_API_PORT"] == 1234


@pytest.mark.parametrize(
    "name, value",
    [
        ("PREFECT_SERVER_API_PORT", "not-a-number"),
        ("PREFECT_API_DATABASE_ECHO", "maybe"),
        ("PREFECT_API_DATABASE_POOL_SIZE", "2.5"),
    ],
)
def test_badly_typed_value_is_a_configuration_error(tmp_path, name, value):
    with pytest.raises(ConfigurationError):
        load_settings(env={"PREFECT_HOME": str(tmp_path), name: value})


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("PREFECT_SERVER_WORKERS", "0", "at least 1"),
        ("PREFECT_SERVER_PROCESSES", "65", "at most 64"),
        ("PREFECT_SERVER_API_PORT", "70000", "at most 65535"),
        ("PREFECT_SERVER_MAX_BODY_BYTES", "-5", "at least 1"),
        ("PREFECT_API_DATABASE_TIMEOUT", "-1", "at least 0"),
        ("PREFECT_API_DATABASE_TIMEOUT", "nan", "finite"),
        ("PREFECT_API_SERVICES_LATE_RUNS_LOOP_SECONDS", "0", "at least 0.01"),  # 0 would spin
        ("PREFECT_API_DEFAULT_LIMIT", "0", "at least 1"),
        # past these, a service's date arithmetic or wait would overflow
        ("PREFECT_SERVER_SERVICES_RETENTION_DAYS", "1e9", "at most 36500"),
        ("PREFECT_API_SERVICES_SCHEDULER_MAX_SCHEDULED_TIME", "1e12", "at most 3200000000"),
        ("PREFECT_API_SERVICES_LATE_RUNS_LOOP_SECONDS", "1e12", "at most 31536000"),
        ("PREFECT_NOTIFICATIONS_MAX_ATTEMPTS", "1000", "at most 100"),
        ("PREFECT_API_DATABASE_POOL_SIZE", "0", "at least 1"),  # no connection at all: every request a 503
        ("PREFECT_API_DATABASE_MAX_OVERFLOW", "-1", "at least 0"),  # SQLAlchemy's "no limit": we have none
    ],
)
def test_a_value_out_of_its_range_is_a_configuration_error_naming_it(tmp_path, name, value, problem):
    for source in ({"env": {name: value}}, {"overrides": {name: value}}):
        with pytest.raises(ConfigurationError) as info:
            load_settings(
                env={"PREFECT_HOME": str(tmp_path), **source.get("env", {})}, overrides=source.get("overrides")
            )
        assert name in str(info.value) and problem in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize(
    "name, value, stored",
    [
        ("PREFECT_API_DATABASE_SQLITE_SYNCHRONOUS", "FULL", "full"),
        ("PREFECT_LOGGING_SERVER_LEVEL", "debug", "DEBUG"),
        ("PREFECT_LOGGING_SERVER_FORMAT", " JSON ", "json"),
    ],
)
def test_a_choice_is_taken_in_any_case(tmp_path, name, value, stored):
    assert load_settings(env={"PREFECT_HOME": str(tmp_path), name: value})[name] == stored


@pytest.mark.parametrize(
    "name, value",
    [
        ("PREFECT_API_DATABASE_SQLITE_SYNCHRONOUS", "off"),
        ("PREFECT_LOGGING_SERVER_LEVEL", "loud"),
        ("PREFECT_LOGGING_SERVER_FORMAT", "xml"),
    ],
)
def test_a_value_that_is_not_one_of_the_choices_is_refused_naming_them(tmp_path, name, value):
    with pytest.raises(ConfigurationError) as info:
        load_settings(env={"PREFECT_HOME": str(tmp_path), name: value})
    message = str(info.value)
    assert name in message and repr(value) in message and "must be one of" in message
    line = assert_one_line_error(run_cli("config", "set", f"{name}={value}", env={"PREFECT_HOME": str(tmp_path)}))
    assert name in line and not (tmp_path / "profiles.toml").exists()


def test_the_postgres_pool_settings_have_prefects_names_and_defaults(tmp_path):
    settings = load_settings(env={"PREFECT_HOME": str(tmp_path)})
    assert (settings["PREFECT_API_DATABASE_POOL_SIZE"], settings["PREFECT_API_DATABASE_MAX_OVERFLOW"]) == (5, 10)
    settings = load_settings(
        env={
            "PREFECT_HOME": str(tmp_path),
            "PREFECT_API_DATABASE_POOL_SIZE": "1",
            "PREFECT_API_DATABASE_MAX_OVERFLOW": "0",
        }
    )
    assert (settings["PREFECT_API_DATABASE_POOL_SIZE"], settings["PREFECT_API_DATABASE_MAX_OVERFLOW"]) == (1, 0)


def test_the_ends_of_a_range_are_accepted(tmp_path):
    settings = load_settings(
        env={
            "PREFECT_HOME": str(tmp_path),
            "PREFECT_SERVER_API_PORT": "0",
            "PREFECT_SERVER_PROCESSES": "64",
            "PREFECT_SERVER_READ_CACHE_SECONDS": "0",
        }
    )
    assert (settings["PREFECT_SERVER_API_PORT"], settings["PREFECT_SERVER_PROCESSES"]) == (0, 64)
    assert settings["PREFECT_SERVER_READ_CACHE_SECONDS"] == 0.0


def test_config_set_refuses_a_value_out_of_range_and_writes_nothing(tmp_path):
    line = assert_one_line_error(
        run_cli("config", "set", "PREFECT_SERVER_PROCESSES=0", env={"PREFECT_HOME": str(tmp_path)})
    )
    assert "PREFECT_SERVER_PROCESSES" in line and "at least 1" in line
    assert not (tmp_path / "profiles.toml").exists()


def test_a_value_out_of_range_in_the_profile_stops_start_with_one_line(tmp_path):
    (tmp_path / "profiles.toml").write_text('active = "default"\n[profiles.default]\nPREFECT_SERVER_WORKERS = "0"\n')
    line = assert_one_line_error(run_cli("start", "--port", "0", env={"PREFECT_HOME": str(tmp_path)}, input_text=""))
    assert "PREFECT_SERVER_WORKERS" in line and "at least 1" in line


def test_start_port_flag_out_of_range_is_one_line(tmp_path):
    line = assert_one_line_error(
        run_cli("start", "--port", "70000", env={"PREFECT_HOME": str(tmp_path)}, input_text="")
    )
    assert "--port" in line and "65535" in line


# ---------------------------------------------------------------------------------------------
# unknown keys


def test_unknown_key_is_rejected_with_the_closest_valid_names():
    with pytest.raises(ConfigurationError) as info:
        prefectlite.check_setting_name("PREFECT_API_DATABASE_CONECTION_URL")
    assert "PREFECT_API_DATABASE_CONNECTION_URL" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        prefectlite.check_setting_name("PREFECT_SERVER_API_PRT")
    assert "PREFECT_SERVER_API_PORT" in str(info.value)


def test_cli_unknown_key_names_the_closest_and_writes_nothing(tmp_path):
    proc = run_cli(
        "config", "set", "PREFECT_API_DATABASE_CONECTION_URL=sqlite:///x.db", env={"PREFECT_HOME": str(tmp_path)}
    )
    line = assert_one_line_error(proc)
    assert "PREFECT_API_DATABASE_CONNECTION_URL" in line
    assert not (tmp_path / "profiles.toml").exists()


# ---------------------------------------------------------------------------------------------
# database URL forms


@pytest.mark.parametrize(
    "template, kind, target",
    [
        ("sqlite:///{tmp}/plain.db", "sqlite", "{tmp}/plain.db"),
        ("sqlite+aiosqlite:///{tmp}/aio.db", "sqlite", "{tmp}/aio.db"),
        ("sqlite+aiosqlite:///file::memory:?cache=shared&uri=true&check_same_thread=false", "sqlite", ":memory:"),
        ("sqlite:///:memory:", "sqlite", ":memory:"),
    ],
)
def test_sqlite_url_forms_parse_and_open(tmp_path, template, kind, target):
    url = template.format(tmp=tmp_path)
    assert parse_database_url(url) == (kind, target.format(tmp=tmp_path))
    db = prefectlite.open_database(url, load_settings(env={"PREFECT_HOME": str(tmp_path)}))
    try:
        assert db.dialect == "sqlite"
        prefectlite.migrate(db)
        assert prefectlite.schema_is_current(db)
    finally:
        db.close()
    if target != ":memory:":
        assert Path(target.format(tmp=tmp_path)).is_file()
    else:
        assert not any(p.name.startswith("file:") or p.name == ":memory:" for p in Path.cwd().iterdir())


def test_relative_sqlite_path():
    assert parse_database_url("sqlite:///relative/dir/x.db") == ("sqlite", "relative/dir/x.db")


@pytest.mark.parametrize(
    "url, expected",
    [
        (
            "postgresql://user:pw@db.example:5433/prefect",
            {"host": "db.example", "port": 5433, "dbname": "prefect", "user": "user", "password": "pw"},
        ),
        (
            "postgresql+asyncpg://user:pw@db.example:5433/prefect",
            {"host": "db.example", "port": 5433, "dbname": "prefect", "user": "user", "password": "pw"},
        ),
        (
            "postgresql+asyncpg://user:p%40ss@host/db",
            {"host": "host", "port": 5432, "dbname": "db", "user": "user", "password": "p@ss"},
        ),
        (
            "postgresql://postgres@127.0.0.1/test",
            {"host": "127.0.0.1", "port": 5432, "dbname": "test", "user": "postgres"},
        ),
    ],
)
def test_postgres_url_forms_parse(url, expected):
    kind, conninfo = parse_database_url(url)
    assert kind == "postgresql"
    assert conninfo == expected


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+asyncpg"])
def test_postgres_url_forms_connect(postgres_url, tmp_path, scheme):
    url = scheme + postgres_url[postgres_url.index("://") :]
    db = prefectlite.open_database(url, load_settings(env={"PREFECT_HOME": str(tmp_path)}))
    try:
        assert db.dialect == "postgresql"
        prefectlite.migrate(db)
        assert prefectlite.schema_is_current(db)
    finally:
        db.close()


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "sqlite:/x.db",
        "sqlite://x.db",
        "mysql://user@host/db",
        "postgresql://host-without-db",
        "postgresql://user@host:notaport/db",
        "",
    ],
)
def test_malformed_urls_are_configuration_errors(url):
    with pytest.raises(ConfigurationError):
        parse_database_url(url)


# ---------------------------------------------------------------------------------------------
# PREFECT_API_DATABASE_PASSWORD


def test_password_setting_used_when_url_has_none(tmp_path):
    _, conninfo = parse_database_url("postgresql://app@db:5432/prefect", password="s3cret")
    assert conninfo["password"] == "s3cret"


def test_password_setting_replaces_the_placeholder():
    _, conninfo = parse_database_url(
        "postgresql+asyncpg://app:${PREFECT_API_DATABASE_PASSWORD}@db:5432/prefect", password="s3cret"
    )
    assert conninfo["password"] == "s3cret"
    assert conninfo["user"] == "app"


def test_password_in_the_url_wins_over_the_setting():
    _, conninfo = parse_database_url("postgresql://app:inurl@db:5432/prefect", password="s3cret")
    assert conninfo["password"] == "inurl"


def test_password_from_the_environment_reaches_the_connection(postgres_url, tmp_path):
    rest = postgres_url.split("://", 1)[1]
    user, hostpart = rest.split("@", 1)
    url = f"postgresql+asyncpg://{user}:${{PREFECT_API_DATABASE_PASSWORD}}@{hostpart}"
    settings = load_settings(
        env={
            "PREFECT_HOME": str(tmp_path),
            "PREFECT_API_DATABASE_CONNECTION_URL": url,
            "PREFECT_API_DATABASE_PASSWORD": "from-env",
        }
    )
    db = prefectlite.open_database(settings["PREFECT_API_DATABASE_CONNECTION_URL"], settings)
    try:
        assert db.conninfo["password"] == "from-env"
        assert db.server_version()
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------
# PREFECT_API_DATABASE_MIGRATE_ON_START


def _current(env):
    proc = run_cli("database", "current", env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_start_refuses_a_schema_behind_when_migrate_on_start_is_false(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path)}
    first = prefectlite.list_revisions()[0].id
    assert run_cli("database", "upgrade", "-y", "-r", first, env=env).returncode == 0
    proc = run_cli(
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        env={**env, "PREFECT_API_DATABASE_MIGRATE_ON_START": "false"},
        timeout=60,
    )
    line = assert_one_line_error(proc)
    assert "database upgrade" in line
    assert _current(env) == first  # nothing migrated


def test_start_refuses_an_empty_database_when_migrate_on_start_is_false(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path), "PREFECT_API_DATABASE_MIGRATE_ON_START": "false"}
    proc = run_cli("start", "--host", "127.0.0.1", "--port", str(free_port()), env=env, timeout=60)
    line = assert_one_line_error(proc)
    assert "database upgrade" in line
    # nothing was migrated: `database current` finds no schema there (and says so rather than "base")
    current = run_cli("database", "current", env={"PREFECT_HOME": str(tmp_path)})
    assert "no prefectlite schema" in assert_one_line_error(current)


def test_start_with_migrate_on_start_false_and_a_current_schema_serves(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path)}
    assert run_cli("database", "upgrade", "-y", env=env).returncode == 0
    server = ServerProcess(tmp_path, {**env, "PREFECT_API_DATABASE_MIGRATE_ON_START": "false"})
    try:
        server.wait_ready()
        assert Client(server.api_url).get("/health") == (200, True)
    finally:
        assert server.stop() == 0


def test_start_migrates_a_schema_behind_by_default(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path)}
    revisions = prefectlite.list_revisions()
    assert run_cli("database", "upgrade", "-y", "-r", revisions[0].id, env=env).returncode == 0
    server = ServerProcess(tmp_path, env)
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0
    assert _current(env) == revisions[-1].id


def test_migrate_on_start_false_from_a_profile(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path)}
    assert run_cli("config", "set", "PREFECT_API_DATABASE_MIGRATE_ON_START=false", env=env).returncode == 0
    proc = run_cli("start", "--host", "127.0.0.1", "--port", str(free_port()), env=env, timeout=60)
    assert "database upgrade" in assert_one_line_error(proc)


# ---------------------------------------------------------------------------------------------
# PREFECT_API_DATABASE_ECHO


def test_echo_logs_sql_of_the_started_server(tmp_path):
    env = {"PREFECT_HOME": str(tmp_path), "PREFECT_API_DATABASE_ECHO": "true"}
    server = ServerProcess(tmp_path, env)
    try:
        server.wait_ready()
        Client(server.api_url).ok("POST", "/flows/", {"name": "echoed-flow"})
    finally:
        code = server.stop()
    assert code == 0
    logged = server.stderr() + server.stdout()
    assert "INSERT INTO flow" in logged, logged[-2000:]


def test_without_echo_the_server_logs_no_sql(tmp_path):
    server = ServerProcess(tmp_path, {"PREFECT_HOME": str(tmp_path)})
    try:
        server.wait_ready()
        Client(server.api_url).ok("POST", "/flows/", {"name": "quiet-flow"})
    finally:
        assert server.stop() == 0
    assert "INSERT INTO flow" not in server.stderr() + server.stdout()


def test_echo_logs_sql_when_embedded(caplog):
    with caplog.at_level(logging.DEBUG, logger="prefectlite"):
        with prefectlite.serve(database="sqlite:///:memory:", port=0, PREFECT_API_DATABASE_ECHO=True) as api_url:
            Client(api_url).ok("POST", "/flows/", {"name": "echo-embedded"})
    assert any("INSERT INTO flow" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------------------------
# a database URL's password is never shown


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://postgres:p@ssSECRETtail@host/db", "postgresql://postgres:********@host/db"),
        ("postgresql://postgres:pa:ssSECRET:tail@host:5433/db", "postgresql://postgres:********@host:5433/db"),
        ("postgresql://postgres:p:@ss@SECRET@host/db", "postgresql://postgres:********@host/db"),
        ("postgresql+asyncpg://postgres:p%40ssSECRET@host/db", "postgresql+asyncpg://postgres:********@host/db"),
        ("postgresql://postgres:@host/db", "postgresql://postgres:@host/db"),  # empty: nothing to hide
        ("postgresql://postgres@host:5432/db", "postgresql://postgres@host:5432/db"),
        ("postgresql://host/db", "postgresql://host/db"),
        ("sqlite:////var/lib/a:b@c.db", "sqlite:////var/lib/a:b@c.db"),  # a path, no user info
        ("sqlite:///:memory:", "sqlite:///:memory:"),
    ],
)
def test_the_password_of_a_database_url_is_masked_from_the_user_info(url, shown):
    assert prefectlite.mask_url_password(url) == shown


@pytest.mark.parametrize("password", ["p@ssSECRETtail", "pa:ssSECRET:t@il", "p%40ssSECRET"])
def test_config_view_and_the_start_up_error_mask_a_password_with_at_and_colon(tmp_path, password):
    # a port that is not a number: the start-up error names the URL, masked
    url = f"postgresql://postgres:{password}@127.0.0.1:notaport/db"
    env = clean_env(PREFECT_HOME=str(tmp_path), PREFECT_API_DATABASE_CONNECTION_URL=url)
    view = run_cli("config", "view", env=env)
    assert view.returncode == 0, view.stderr
    assert "postgres:********@127.0.0.1:notaport/db" in view.stdout
    start = run_cli("start", "--port", "0", env=env, timeout=60)
    assert start.returncode != 0
    assert "postgres:********@127.0.0.1:notaport/db" in start.stderr
    for output in (view.stdout, view.stderr, start.stdout, start.stderr):
        assert "SECRET" not in output and password not in output, output


def test_admin_settings_mask_a_password_with_an_at_sign(tmp_path):
    settings = load_settings(
        env={"PREFECT_HOME": str(tmp_path), "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql://u:p@ssSECRET@h/db"}
    )
    assert settings.masked()["PREFECT_API_DATABASE_CONNECTION_URL"] == "postgresql://u:********@h/db"
