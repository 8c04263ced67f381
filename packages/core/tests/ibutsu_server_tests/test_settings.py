import random
import string
import urllib.parse
from pathlib import Path

import pytest

from ibutsu_server.settings import LIMITS, ConfigError, Role, load_settings, redact_url

BROKER = {
    "CELERY_BROKER_URL": "redis://:s3cret@redis:6379/0",
    "CELERY_RESULT_BACKEND": "redis://redis:6379/1",
}
DATABASE = {
    "POSTGRESQL_HOST": "db",
    "POSTGRESQL_USER": "ibutsu",
    "POSTGRESQL_PASSWORD": "pg-s3cret",
    "POSTGRESQL_DATABASE": "ibutsu",
}


def test_worker_reads_every_variable_with_defaults() -> None:
    settings = load_settings(Role.WORKER, {**BROKER, **DATABASE})
    assert settings.database is not None
    assert (settings.database.host, settings.database.port) == ("db", 5432)
    assert settings.worker_concurrency == 1
    assert settings.result_expires == 86400
    assert settings.task_time_limit is None
    assert settings.worker_loglevel == "info"
    assert not settings.embedded


def test_optional_values_are_typed() -> None:
    env = {
        **BROKER,
        **DATABASE,
        "POSTGRESQL_PORT": "6543",
        "CELERY_WORKER_CONCURRENCY": "4",
        "CELERY_RESULT_EXPIRES": "60",
        "CELERY_TASK_TIME_LIMIT": "3600",
        "CELERY_WORKER_LOGLEVEL": "DEBUG",
    }
    settings = load_settings(Role.WORKER, env)
    assert settings.database is not None and settings.database.port == 6543
    assert (settings.worker_concurrency, settings.result_expires) == (4, 60)
    assert settings.task_time_limit == 3600
    # Running tasks renew their messages: a dead worker's come back after 90 s, however long
    # a task may run.
    assert (settings.visibility_timeout, settings.soft_shutdown_seconds) == (90, 20)
    assert settings.worker_loglevel == "debug"


def test_the_probes_need_only_the_port() -> None:
    env = {**BROKER, **DATABASE, "IBUTSU_METRICS_PORT": "9808"}
    metrics = load_settings(Role.WORKER, env).metrics
    assert metrics is not None
    assert (metrics.port, metrics.basic_auth, metrics.liveness_seconds) == (9808, None, 120)
    env |= {"IBUTSU_METRICS_BASIC_AUTH": "prometheus:scrape-password-1"}
    env |= {"IBUTSU_LIVENESS_TIMEOUT": "30"}
    metrics = load_settings(Role.SCHEDULER, env).metrics
    assert metrics is not None
    assert (metrics.basic_auth, metrics.liveness_seconds) == ("prometheus:scrape-password-1", 30)
    with pytest.raises(ConfigError, match="IBUTSU_LIVENESS_TIMEOUT must be at least 10"):
        load_settings(Role.WORKER, {**env, "IBUTSU_LIVENESS_TIMEOUT": "5"})


def test_every_problem_is_listed_at_once() -> None:
    env = {
        "CELERY_BROKER_URL": "http://nope",
        "POSTGRESQL_HOST": "db",
        "POSTGRESQL_PORT": "five",
        "CELERY_WORKER_CONCURRENCY": "0",
        "CELERY_WORKER_LOGLEVEL": "loud",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, env)
    message = str(caught.value)
    for expected in (
        "CELERY_BROKER_URL must be a URL scheme://host",
        "CELERY_RESULT_BACKEND is not set",
        "POSTGRESQL_PORT must be an integer",
        "POSTGRESQL_USER is not set",
        "POSTGRESQL_DATABASE is not set",
        "CELERY_WORKER_CONCURRENCY must be at least 1",
        "CELERY_WORKER_LOGLEVEL must be one of",
    ):
        assert expected in message
    assert len(caught.value.problems) == 7
    assert message.startswith("ibutsu worker: invalid configuration")


def test_each_role_reads_only_its_own_variables() -> None:
    worker_only = {
        "IBUTSU_IMPORT_MAX_RESULTS": "lots",
        "CELERY_WORKER_CONCURRENCY": "0",
        "CELERY_TASK_TIME_LIMIT": "soon",
    }
    scheduler_only = {"IBUTSU_PRUNE_RUNS_MONTHS": "forever"}
    flower = {**BROKER, "FLOWER_BASIC_AUTH": "admin:a-long-password"}
    load_settings(Role.FLOWER, {**flower, **worker_only, **scheduler_only})
    load_settings(Role.SCHEDULER, {**BROKER, **DATABASE, **worker_only})
    load_settings(Role.WORKER, {**BROKER, **DATABASE, **scheduler_only})
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, {**BROKER, **DATABASE, **worker_only})
    assert len(caught.value.problems) == 3
    assert "IBUTSU_IMPORT_MAX_RESULTS must be an integer, got 'lots'" in caught.value.problems


def test_import_limits_name_their_variable() -> None:
    limits = load_settings(
        Role.WORKER, {**BROKER, **DATABASE, "IBUTSU_IMPORT_MAX_RESULTS": "10"}
    ).import_limits
    assert limits.max_results == 10
    assert limits.refusal("max_results") == (
        "too many results: the limit is 10 per import (IBUTSU_IMPORT_MAX_RESULTS)"
    )


def test_flower_needs_only_the_broker_and_its_credentials() -> None:
    settings = load_settings(Role.FLOWER, {**BROKER, "FLOWER_BASIC_AUTH": "admin:a-long-password"})
    assert settings.database is None
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.FLOWER, {"FLOWER_BASIC_AUTH": "admin:short"})
    problems = caught.value.problems
    assert "CELERY_BROKER_URL is not set" in problems
    assert "FLOWER_BASIC_AUTH password must be at least 12 characters" in problems
    assert not any("POSTGRESQL" in problem for problem in problems)


@pytest.mark.parametrize("value", ["admin:Sh0rt,xxxxxxxxxxxx", "admin:a-long-password\n"])
def test_flower_credentials_flower_would_read_differently(value: str) -> None:
    with pytest.raises(ConfigError, match="one 'user:password', without commas or spaces"):
        load_settings(Role.FLOWER, {**BROKER, "FLOWER_BASIC_AUTH": value})


def test_flower_is_never_embedded() -> None:
    with pytest.raises(ConfigError, match="FLOWER_BASIC_AUTH is not set"):
        load_settings(Role.FLOWER, {})


def test_embedded_default_when_nothing_is_configured(tmp_path: Path) -> None:
    settings = load_settings(Role.WORKER, {"IBUTSU_EMBEDDED_DIR": str(tmp_path)})
    assert settings.embedded
    assert settings.broker_url == "filesystem://"
    assert settings.database is not None
    assert settings.database.sqlite_path == tmp_path / "ibutsu.sqlite3"


def test_half_configured_is_an_error_not_embedded() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, {"POSTGRESQL_HOST": "db"})
    assert "CELERY_BROKER_URL is not set" in caught.value.problems


def test_a_visibility_timeout_too_short_to_renew_is_refused() -> None:
    env = {**BROKER, **DATABASE, "CELERY_VISIBILITY_TIMEOUT": "5"}
    with pytest.raises(ConfigError, match="CELERY_VISIBILITY_TIMEOUT must be at least 10"):
        load_settings(Role.WORKER, env)


def test_passwords_never_appear_in_errors_or_displays() -> None:
    env = {**DATABASE, "CELERY_BROKER_URL": "ftp://:s3cret@redis/0"}
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, env)
    assert "s3cret" not in str(caught.value)
    settings = load_settings(Role.WORKER, {**BROKER, **DATABASE})
    assert settings.database is not None
    assert "pg-s3cret" not in settings.database.display


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("amqp://user:s3cret@mq/vhost", "amqp://user:***@mq/vhost"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        # Celery's sentinel lists, and passwords nobody URL-encoded.
        (
            "sentinel://:pw1@h1:26379;sentinel://:pw2@h2:26379",
            "sentinel://:***@h1:26379;sentinel://:***@h2:26379",
        ),
        ("redis://:top/secret@h/0", "redis://:***@h/0"),
        ("redis://:pa#ss?word@h:6379/0", "redis://:***@h:6379/0"),
        # Not scheme://: everything before the host goes.
        ("redis:/:s3cret@h:6379/0", "redis:***@h:6379/0"),
        ("redis:user:s3cret@h", "redis:***@h"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis:/:s3cret@redis:6379/0", "must be a URL scheme://host"),
        ("redis:s3cret@redis:6379/0", "must be a URL scheme://host"),
        ("redis://:s3cret@/0", "names no host"),
        ("redis://:s3cret@redis:notaport/0", "names no host"),
        ("filesystem://", "must be a URL scheme://host"),
        ("sentinel://:s3cret@h1:26379;sentinel:/h2", "must be a URL scheme://host"),
    ],
)
def test_a_broker_url_needs_a_scheme_and_a_host_and_never_shows_its_password(
    url: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, {**BROKER, **DATABASE, "CELERY_BROKER_URL": url})
    assert problem in str(caught.value)
    assert "s3cret" not in str(caught.value)


# Every numeric variable, the role that reads it, and its range.
RANGES = [
    ("POSTGRESQL_PORT", Role.WORKER, 1, 65535),
    ("IBUTSU_METRICS_PORT", Role.WORKER, 1, 65535),
    ("IBUTSU_LIVENESS_TIMEOUT", Role.SCHEDULER, 10, 3600),
    ("CELERY_WORKER_CONCURRENCY", Role.WORKER, 1, 256),
    ("CELERY_TASK_TIME_LIMIT", Role.WORKER, 1, 7 * 86400),
    ("CELERY_VISIBILITY_TIMEOUT", Role.WORKER, 10, 86400),
    ("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", Role.WORKER, 0, 3600),
    ("CELERY_RESULT_EXPIRES", Role.FLOWER, 0, 30 * 86400),
    ("IBUTSU_PRUNE_FILES_MONTHS", Role.SCHEDULER, 1, 1200),
    ("IBUTSU_PRUNE_RESULTS_MONTHS", Role.SCHEDULER, 1, 1200),
    ("IBUTSU_PRUNE_RUNS_MONTHS", Role.SCHEDULER, 1, 1200),
    ("IBUTSU_PRUNE_IMPORT_FILES_DAYS", Role.SCHEDULER, 1, 1200 * 31),
    *((limit.variable, Role.WORKER, limit.minimum, limit.maximum) for limit in LIMITS.values()),
]


@pytest.mark.parametrize(("variable", "role", "low", "high"), RANGES, ids=[r[0] for r in RANGES])
def test_every_numeric_setting_has_a_range(variable: str, role: Role, low: int, high: int) -> None:
    env = {**BROKER, **DATABASE, "FLOWER_BASIC_AUTH": "admin:a-long-password"}
    if variable == "IBUTSU_LIVENESS_TIMEOUT":
        env["IBUTSU_METRICS_PORT"] = "9808"
    for good in (low, high):
        load_settings(role, {**env, variable: str(good)})
    for bad in (low - 1, high + 1, 99999999999999999999):
        with pytest.raises(ConfigError) as caught:
            load_settings(role, {**env, variable: str(bad)})
        assert caught.value.problems == [
            f"{variable} must be at least {low} and at most {high}, got {bad}"
        ]


def test_the_settings_of_the_issue_are_refused_by_name() -> None:
    env = {
        **BROKER,
        **DATABASE,
        "CELERY_VISIBILITY_TIMEOUT": "99999999999999999999",
        "CELERY_WORKER_CONCURRENCY": "99999999",
        "IBUTSU_METRICS_PORT": "0",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, env)
    assert caught.value.problems == [
        "CELERY_WORKER_CONCURRENCY must be at least 1 and at most 256, got 99999999",
        "CELERY_VISIBILITY_TIMEOUT must be at least 10 and at most 86400, "
        "got 99999999999999999999",
        "IBUTSU_METRICS_PORT must be at least 1 and at most 65535, got 0",
    ]


# --- redaction, over generated URLs ---------------------------------------------------------

# What a password may hold, unencoded and encoded, and the pieces that look like a URL's own
# structure, so that generated passwords try every way of confusing the redaction.
PASSWORD_PIECES = [
    *string.ascii_letters,
    *string.digits,
    *"-._~!$&'()*+,;=:@%/?#",
    "%3B",
    "%40",
    "%3A",
    "%25",
    "%2F",
    "://",
    ";redis://",
    "@h;",
    ";sentinel://u:",
    "@",
    "::",
]
SCHEMES = ("redis", "rediss", "sentinel", "amqp")


def _password(rng: random.Random) -> str:
    # A random core makes a password unlikely to occur elsewhere in its URL by chance.
    core = "".join(rng.choices(string.ascii_letters + string.digits, k=6))
    before = "".join(rng.choices(PASSWORD_PIECES, k=rng.randint(0, 6)))
    after = "".join(rng.choices(PASSWORD_PIECES, k=rng.randint(0, 6)))
    return before + core + after


def _url(rng: random.Random, password: str) -> str:
    user = rng.choice(["", "default", "ibutsu"])
    host = rng.choice(["redis", "10.0.0.7", "[::1]", "redis.example.com"])
    port = rng.choice(["", ":6379", ":26379"])
    return f"{rng.choice(SCHEMES)}://{user}:{password}@{host}{port}/{rng.randint(0, 15)}"


def test_no_password_survives_redaction_whatever_it_holds() -> None:
    rng = random.Random(18)
    for _ in range(5000):
        passwords = [_password(rng) for _ in range(rng.randint(1, 3))]
        url = ";".join(_url(rng, password) for password in passwords)
        shown = redact_url(url)
        for password in passwords:
            assert password not in shown, (url, shown)
            assert urllib.parse.unquote(password) not in shown, (url, shown)
        try:
            load_settings(Role.WORKER, {**BROKER, **DATABASE, "CELERY_BROKER_URL": url})
            message = ""
        except ConfigError as error:
            message = str(error)
        assert not any(password in message for password in passwords), message


def test_a_password_with_a_semicolon_is_not_split_into_urls() -> None:
    url = "redis://:ab12;cd34@host:6379/11"
    assert redact_url(url) == "redis://:***@host:6379/11"
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, {**BROKER, **DATABASE, "CELERY_BROKER_URL": url})
    assert "ab12" not in str(caught.value) and "cd34" not in str(caught.value)


SENTINELS = "sentinel://:redis-pw-1@s1:26379;sentinel://:redis-pw-1@s2:26379;sentinel://s3:26379"


def test_sentinel_urls_take_a_master_name_and_the_sentinels_own_password() -> None:
    env = {
        **DATABASE,
        "CELERY_BROKER_URL": SENTINELS + "/0",
        "CELERY_RESULT_BACKEND": SENTINELS + "/1",
        "IBUTSU_REDIS_SENTINEL_MASTER": "ibutsu",
        "IBUTSU_REDIS_SENTINEL_PASSWORD": "sentinel-s3cret",
    }
    for role in Role:
        redis = load_settings(role, {**env, "FLOWER_BASIC_AUTH": "admin:correct-horse-b"}).redis
        assert (redis.sentinel_master, redis.sentinel_password) == ("ibutsu", "sentinel-s3cret")
        assert "sentinel-s3cret" not in repr(redis)
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, {**env, "IBUTSU_REDIS_SENTINEL_MASTER": ""})
    assert "IBUTSU_REDIS_SENTINEL_MASTER is not set" in str(caught.value)
    assert "redis-pw-1" not in str(caught.value)
    mixed = {**env, "CELERY_RESULT_BACKEND": "redis://r:6379/1;" + SENTINELS}
    with pytest.raises(ConfigError, match="CELERY_RESULT_BACKEND mixes sentinel"):
        load_settings(Role.WORKER, mixed)


def test_tls_files_must_be_readable_and_a_certificate_comes_with_its_key(
    tmp_path: Path,
) -> None:
    ca, cert, key = (tmp_path / name for name in ("ca.crt", "client.crt", "client.key"))
    for path in (ca, cert, key):
        path.write_text("-----BEGIN-----\n")
    env = {
        **DATABASE,
        "CELERY_BROKER_URL": "rediss://:s3cret@redis:6380/0",
        "CELERY_RESULT_BACKEND": "rediss://:s3cret@redis:6380/1",
        "IBUTSU_REDIS_TLS_CA_FILE": str(ca),
        "IBUTSU_REDIS_TLS_CERT_FILE": str(cert),
        "IBUTSU_REDIS_TLS_KEY_FILE": str(key),
    }
    redis = load_settings(Role.WORKER, env).redis
    assert (redis.tls_ca_file, redis.tls_cert_file, redis.tls_key_file) == (ca, cert, key)
    bad = {**env, "IBUTSU_REDIS_TLS_CA_FILE": str(tmp_path / "missing.crt")}
    del bad["IBUTSU_REDIS_TLS_KEY_FILE"]
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, bad)
    assert "missing.crt is not a readable file" in str(caught.value)
    assert "IBUTSU_REDIS_TLS_CERT_FILE and IBUTSU_REDIS_TLS_KEY_FILE go together" in str(
        caught.value
    )


def test_redis_variables_set_for_no_url_are_a_mistake() -> None:
    env = {
        **BROKER,
        **DATABASE,
        "IBUTSU_REDIS_SENTINEL_MASTER": "ibutsu",
        "IBUTSU_REDIS_TLS_CA_FILE": "/etc/ssl/certs/ca-certificates.crt",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(Role.WORKER, env)
    message = str(caught.value)
    assert "IBUTSU_REDIS_SENTINEL_MASTER is set but no Redis URL is sentinel://" in message
    assert "IBUTSU_REDIS_TLS_CA_FILE is set but no Redis URL is rediss://" in message
