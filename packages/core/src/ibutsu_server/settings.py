"""Typed settings, parsed once from the environment and validated per role.

Nothing here imports Celery, Flask or SQLAlchemy: the Flower role loads this module too.
"""

from __future__ import annotations

import enum
import os
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

EMBEDDED_DIR_VAR = "IBUTSU_EMBEDDED_DIR"
DEFAULT_EMBEDDED_DIR = "var/embedded"
POSTGRESQL_VARS = (
    "POSTGRESQL_HOST",
    "POSTGRESQL_PORT",
    "POSTGRESQL_USER",
    "POSTGRESQL_PASSWORD",
    "POSTGRESQL_DATABASE",
)
MIN_PASSWORD_LENGTH = 12
GIB = 1024 * 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# A message that nobody renewed for this long is handed to another worker: its worker is gone.
# Workers renew the messages they hold (ibutsu_worker.process.leases), however long their tasks run.
DEFAULT_VISIBILITY_TIMEOUT = 90
# Seconds a warm shutdown (SIGTERM) waits for running tasks before it hands them back; inside
# Kubernetes' default grace period of 30 s.
DEFAULT_SOFT_SHUTDOWN_SECONDS = 20
# Longer than any wait the main loops make on purpose (a Redis socket timeout is 30 s).
DEFAULT_LIVENESS_SECONDS = 120
# Upper ends of the numeric variables' ranges: beyond them a value is a typo or an attack
# (an overflow, a fork bomb), never a deployment's choice.
HOUR = 3600
DAY = 24 * HOUR
MAX_PORT = 65535
MAX_CONCURRENCY = 256
MAX_RETENTION_MONTHS = 1200


class Role(enum.Enum):
    """The three processes this project runs, plus the operator's command line."""

    WORKER = "worker"
    SCHEDULER = "scheduler"
    FLOWER = "flower"

    @property
    def needs_database(self) -> bool:
        return self is not Role.FLOWER


class ConfigError(Exception):
    """Every problem found in the environment for one role, reported together."""

    def __init__(self, role: Role, problems: list[str]) -> None:
        self.role = role
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"ibutsu {role.value}: invalid configuration:\n{lines}")


@dataclass(frozen=True)
class DatabaseSettings:
    """Where the database is: PostgreSQL components, or an SQLite file (embedded default)."""

    host: str = ""
    port: int = 5432
    user: str = ""
    password: str = ""
    database: str = ""
    sqlite_path: Path | None = None

    @property
    def display(self) -> str:
        """A description safe to log: never contains the password."""
        if self.sqlite_path is not None:
            return f"sqlite:///{self.sqlite_path}"
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class Limit:
    """One import limit: the variable that sets it, its default and range, and how a refusal
    reads."""

    variable: str
    default: int
    refusal: str  # formatted with {limit} and {found}
    maximum: int
    minimum: int = 1


#: Every import limit, by its ImportLimits field: the one place its variable and message live.
LIMITS = {
    "max_upload_bytes": Limit(
        "IBUTSU_IMPORT_MAX_UPLOAD_BYTES",
        512 * 1024 * 1024,
        "the report is {found} bytes, over the upload limit of {limit} bytes",
        maximum=GIB,  # PostgreSQL stores no bytea value over 1 GB
    ),
    "max_results": Limit(
        "IBUTSU_IMPORT_MAX_RESULTS",
        2_000_000,
        "too many results: the limit is {limit} per import",
        maximum=10_000_000,
    ),
    "max_archive_members": Limit(
        "IBUTSU_IMPORT_MAX_ARCHIVE_MEMBERS",
        200_000,
        "the archive has more than {limit} members",
        maximum=1_000_000,
    ),
    "max_archive_bytes": Limit(
        "IBUTSU_IMPORT_MAX_ARCHIVE_BYTES",
        2 * GIB,
        "the archive unpacks to more than {limit} bytes",
        maximum=16 * GIB,
    ),
    "max_artifact_bytes": Limit(
        "IBUTSU_IMPORT_MAX_ARTIFACT_BYTES",
        64 * 1024 * 1024,
        "{found} is over the limit of {limit} bytes per file",
        maximum=GIB,
    ),
    "max_footprint_ratio": Limit(
        "IBUTSU_IMPORT_MAX_FOOTPRINT_RATIO",
        8,
        "the report would store more than {limit} times its size plus 256 bytes a row "
        "({found} so far): a value it repeats into every result is too big",
        minimum=2,
        maximum=100,
    ),
    "max_deliveries": Limit(
        "IBUTSU_IMPORT_MAX_DELIVERIES",
        3,
        "the worker died while importing it, {found} times; it was stopped so that it cannot "
        "take down more workers",
        maximum=100,
    ),
}


@dataclass(frozen=True)
class ImportLimits:
    """Bounds on what one import may bring in; each refusal names the variable that sets it."""

    max_upload_bytes: int = LIMITS["max_upload_bytes"].default
    max_results: int = LIMITS["max_results"].default
    max_archive_members: int = LIMITS["max_archive_members"].default
    max_archive_bytes: int = LIMITS["max_archive_bytes"].default
    max_artifact_bytes: int = LIMITS["max_artifact_bytes"].default
    max_footprint_ratio: int = LIMITS["max_footprint_ratio"].default
    max_deliveries: int = LIMITS["max_deliveries"].default

    def refusal(self, name: str, found: object = "") -> str:
        """Why an input over the limit ``name`` is refused, naming the variable to change."""
        limit = LIMITS[name]
        text = limit.refusal.format(limit=getattr(self, name), found=found)
        return f"{text} ({limit.variable})"


@dataclass(frozen=True)
class Retention:
    """How old data gets before the scheduler's weekly and daily pruning removes it."""

    files_months: int = 3
    results_months: int = 5
    runs_months: int = 12
    import_files_days: int = 7


@dataclass(frozen=True)
class MetricsSettings:
    """The role's HTTP endpoint: /healthz and /readyz open, /metrics only with basic-auth
    credentials (without them it is not served); liveness fails once the role's main loop
    has not ticked for ``liveness_seconds``."""

    port: int
    basic_auth: str | None
    liveness_seconds: int = DEFAULT_LIVENESS_SECONDS


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis beyond what its URLs say: the Sentinel group's master name and the
    sentinels' own password (``sentinel://`` URLs), the CA and client certificate of TLS
    (``rediss://`` URLs). One set for every Redis URL of the role: broker, result backend and
    the scheduler's lease (on the broker)."""

    sentinel_master: str | None = None
    sentinel_password: str = field(default="", repr=False)
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a role needs from its environment, already validated."""

    role: Role
    broker_url: str
    result_backend: str | None
    database: DatabaseSettings | None
    embedded_dir: Path | None
    flower_basic_auth: str | None
    worker_concurrency: int
    result_expires: int
    task_time_limit: int | None
    visibility_timeout: int
    soft_shutdown_seconds: int
    worker_loglevel: str
    redis_key_prefix: str
    import_limits: ImportLimits
    timezone: str
    retention: Retention
    metrics: MetricsSettings | None
    redis: RedisSettings = field(default_factory=RedisSettings)

    @property
    def embedded(self) -> bool:
        return self.embedded_dir is not None

    @property
    def redis_urls(self) -> dict[str, str]:
        """The role's Redis URLs by the variable that sets each (broker, result backend)."""
        return _redis_urls(self.broker_url, self.result_backend)


def redact_url(url: str) -> str:
    """``url`` with every password in it replaced by '***': of each URL in Celery's 'url;url'
    lists, or, when a password may itself hold ';', '@', ':' or '://', of all of them at once.

    Cuts by text, not by parsing: a password with unencoded '/', '#', '?', ';', '@' or '%'
    still goes. Each URL's user stays, and each host when the list can be split unambiguously:
    every part then names a user and a non-empty password ending at its last '@', so whatever
    a password holds, its first characters are in the part they start in and are masked."""
    parts = _URL_START.split(url)
    if all(_CREDENTIALS.fullmatch(part) for part in parts):
        return ";".join(_mask(part, part.index("://") + 3) for part in parts)
    start = url.find("://")
    return _mask(url, start + 3 if start >= 0 else 0)


# A ';' that starts another URL of a list (Celery's failover and Sentinel lists).
_URL_START = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")
# scheme://user:password@host with a non-empty password, up to the part's last '@'.
_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^:@]*:.+@[^@]*", re.DOTALL)


def _mask(url: str, start: int) -> str:
    """``url`` with what lies between the user (from ``start`` to the first ':' or '@') and
    the last '@' replaced by ':***'; unchanged without an '@' (no credentials)."""
    end = url.rfind("@")
    if end < start:
        return url
    user = re.match(r"[^:@]*", url[start:end])
    assert user is not None  # matches the empty string at least
    return f"{url[:start]}{user.group()}:***{url[end:]}"


class _Reader:
    """Reads variables from one environment and collects every problem instead of stopping."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def text(self, name: str, *, required: bool) -> str:
        value = self.environ.get(name, "").strip()
        if required and not value:
            self.problems.append(f"{name} is not set")
        return value

    def credentials(self, name: str) -> str:
        """A required 'user:password' with a non-empty user and a password of 12+ characters."""
        raw = self.environ.get(name, "")
        value = self.text(name, required=True)
        user, sep, password = value.partition(":")
        if value and (raw != value or "," in value):
            # Flower reads a comma as a list of credentials and compares them unstripped.
            self.problems.append(f"{name} must be one 'user:password', without commas or spaces")
        elif value and (not sep or not user):
            self.problems.append(f"{name} must be 'user:password' with a non-empty user")
        elif value and len(password) < MIN_PASSWORD_LENGTH:
            self.problems.append(
                f"{name} password must be at least {MIN_PASSWORD_LENGTH} characters"
            )
        return value

    def count(self, name: str, default: int, *, minimum: int = 1, maximum: int) -> int:
        """An integer variable that always has a value: ``default`` when unset or bad."""
        value = self.integer(name, default, minimum=minimum, maximum=maximum)
        return default if value is None else value

    def integer(self, name: str, default: int | None, *, minimum: int, maximum: int) -> int | None:
        """An integer variable within ``minimum``..``maximum``; ``default`` when unset, and a
        problem naming the variable and its range when out of it."""
        raw = self.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name} must be an integer, got {raw[:40]!r}")
            return default
        if not minimum <= value <= maximum:
            self.problems.append(
                f"{name} must be at least {minimum} and at most {maximum}, got {raw[:40]}"
            )
            return default
        return value

    def url(self, name: str, *, required: bool, schemes: tuple[str, ...]) -> str:
        """A URL (or Celery's 'url;url' list) of one of ``schemes``, each with its host."""
        value = self.text(name, required=required)
        for part in value.split(";") if value else ():
            scheme, sep, _ = part.partition("://")
            if not sep or scheme not in schemes:
                self.problems.append(
                    f"{name} must be a URL scheme://host... with scheme "
                    f"{' or '.join(schemes)}, got {redact_url(value)!r}"
                )
                return value
            if scheme not in HOSTLESS_SCHEMES and not _host(part):
                self.problems.append(f"{name} names no host: {redact_url(value)!r}")
                return value
        return value


def _host(url: str) -> str | None:
    """The URL's host; None when it has none or its address or port is malformed."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return None
    return parts.hostname


BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "sentinel")
REDIS_SCHEMES = ("redis", "rediss", "sentinel")
SENTINEL_VARS = ("IBUTSU_REDIS_SENTINEL_MASTER", "IBUTSU_REDIS_SENTINEL_PASSWORD")
TLS_VARS = ("IBUTSU_REDIS_TLS_CA_FILE", "IBUTSU_REDIS_TLS_CERT_FILE", "IBUTSU_REDIS_TLS_KEY_FILE")
BACKEND_SCHEMES = ("redis", "rediss", "sentinel", "rpc", "db+postgresql", "db+sqlite")
# Result backends that need no host: the broker's own reply queues, an SQLite file.
HOSTLESS_SCHEMES = ("rpc", "db+sqlite")


def _scheme(url: str) -> str:
    return url.partition("://")[0]


def _redis_urls(broker_url: str, result_backend: str | None) -> dict[str, str]:
    urls = {"CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": result_backend or ""}
    return {name: url for name, url in urls.items() if _scheme(url) in REDIS_SCHEMES}


def _readable_file(reader: _Reader, name: str) -> Path | None:
    value = reader.text(name, required=False)
    if not value:
        return None
    path = Path(value)
    if not path.is_file() or not os.access(path, os.R_OK):
        reader.problems.append(f"{name}: {value} is not a readable file")
    return path


def _read_redis(reader: _Reader, urls: Mapping[str, str]) -> RedisSettings:
    """The Sentinel and TLS variables, checked against the URLs that use them."""
    schemes = {name: {_scheme(part) for part in url.split(";")} for name, url in urls.items()}
    sentinel = [name for name, found in schemes.items() if "sentinel" in found]
    tls = [name for name, found in schemes.items() if "rediss" in found]
    for name in sentinel:
        if schemes[name] != {"sentinel"}:
            reader.problems.append(f"{name} mixes sentinel:// with other URLs")
    master = reader.text("IBUTSU_REDIS_SENTINEL_MASTER", required=False)
    if sentinel and not master:
        reader.problems.append(
            f"IBUTSU_REDIS_SENTINEL_MASTER is not set (the name of the master {sentinel[0]}'s "
            "sentinels watch)"
        )
    password = reader.environ.get("IBUTSU_REDIS_SENTINEL_PASSWORD", "")
    settings = RedisSettings(
        sentinel_master=master or None,
        sentinel_password=password,
        tls_ca_file=_readable_file(reader, "IBUTSU_REDIS_TLS_CA_FILE"),
        tls_cert_file=_readable_file(reader, "IBUTSU_REDIS_TLS_CERT_FILE"),
        tls_key_file=_readable_file(reader, "IBUTSU_REDIS_TLS_KEY_FILE"),
    )
    # Set for nothing is a mistake worth a word: the operator meant some URL to use it.
    for names, used, kind in (
        (SENTINEL_VARS, sentinel, "sentinel://"),
        (TLS_VARS, tls, "rediss://"),
    ):
        for name in names:
            if reader.environ.get(name, "").strip() and not used:
                reader.problems.append(f"{name} is set but no Redis URL is {kind}")
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        reader.problems.append(
            "IBUTSU_REDIS_TLS_CERT_FILE and IBUTSU_REDIS_TLS_KEY_FILE go together (a client "
            "certificate and its key)"
        )
    return settings


def _embedded_requested(role: Role, environ: Mapping[str, str]) -> bool:
    if not role.needs_database:
        return False
    configured = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", *POSTGRESQL_VARS)
    return not any(environ.get(name, "").strip() for name in configured)


def _read_database(reader: _Reader) -> DatabaseSettings:
    port = reader.count("POSTGRESQL_PORT", 5432, maximum=MAX_PORT)
    return DatabaseSettings(
        host=reader.text("POSTGRESQL_HOST", required=True),
        port=port,
        user=reader.text("POSTGRESQL_USER", required=True),
        password=reader.text("POSTGRESQL_PASSWORD", required=False),
        database=reader.text("POSTGRESQL_DATABASE", required=True),
    )


def _known_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _read_metrics(reader: _Reader) -> MetricsSettings | None:
    port = reader.integer("IBUTSU_METRICS_PORT", None, minimum=1, maximum=MAX_PORT)
    if port is None:
        return None
    basic_auth = None
    if reader.environ.get("IBUTSU_METRICS_BASIC_AUTH", "").strip():
        basic_auth = reader.credentials("IBUTSU_METRICS_BASIC_AUTH")
    liveness = reader.count(
        "IBUTSU_LIVENESS_TIMEOUT", DEFAULT_LIVENESS_SECONDS, minimum=10, maximum=HOUR
    )
    return MetricsSettings(port=port, basic_auth=basic_auth, liveness_seconds=liveness)


def _read_import_limits(reader: _Reader) -> ImportLimits:
    return ImportLimits(
        **{
            name: reader.count(
                limit.variable, limit.default, minimum=limit.minimum, maximum=limit.maximum
            )
            for name, limit in LIMITS.items()
        }
    )


def _read_retention(reader: _Reader) -> Retention:
    months = MAX_RETENTION_MONTHS
    return Retention(
        files_months=reader.count(
            "IBUTSU_PRUNE_FILES_MONTHS", Retention.files_months, maximum=months
        ),
        results_months=reader.count(
            "IBUTSU_PRUNE_RESULTS_MONTHS", Retention.results_months, maximum=months
        ),
        runs_months=reader.count("IBUTSU_PRUNE_RUNS_MONTHS", Retention.runs_months, maximum=months),
        import_files_days=reader.count(
            "IBUTSU_PRUNE_IMPORT_FILES_DAYS", Retention.import_files_days, maximum=months * 31
        ),
    )


@dataclass(frozen=True)
class _Execution:
    """How a worker runs tasks: pool size, time limit, redelivery, shutdown."""

    concurrency: int = 1
    time_limit: int | None = None
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    soft_shutdown_seconds: int = DEFAULT_SOFT_SHUTDOWN_SECONDS


def _read_execution(reader: _Reader) -> _Execution:
    return _Execution(
        concurrency=reader.count("CELERY_WORKER_CONCURRENCY", 1, maximum=MAX_CONCURRENCY),
        time_limit=reader.integer("CELERY_TASK_TIME_LIMIT", None, minimum=1, maximum=7 * DAY),
        visibility_timeout=reader.count(
            "CELERY_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT, minimum=10, maximum=DAY
        ),
        soft_shutdown_seconds=reader.count(
            "CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT",
            DEFAULT_SOFT_SHUTDOWN_SECONDS,
            minimum=0,
            maximum=HOUR,
        ),
    )


def load_settings(role: Role, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate the environment for ``role``; raise ConfigError listing every problem.

    Each role reads only the variables it uses, so a bad worker-only value (an import limit,
    say) never stops the scheduler or Flower."""
    env = os.environ if environ is None else environ
    reader = _Reader(env)
    embedded_dir: Path | None = None
    database: DatabaseSettings | None = None
    if _embedded_requested(role, env):
        embedded_dir = Path(env.get(EMBEDDED_DIR_VAR, DEFAULT_EMBEDDED_DIR)).absolute()
        broker_url = "filesystem://"  # folders set in celery_utils
        result_backend: str | None = None
        database = DatabaseSettings(sqlite_path=embedded_dir / "ibutsu.sqlite3")
    else:
        broker_url = reader.url("CELERY_BROKER_URL", required=True, schemes=BROKER_SCHEMES)
        result_backend = (
            reader.url("CELERY_RESULT_BACKEND", required=True, schemes=BACKEND_SCHEMES) or None
        )
        if role.needs_database:
            database = _read_database(reader)
    redis = _read_redis(reader, _redis_urls(broker_url, result_backend))

    loglevel = env.get("CELERY_WORKER_LOGLEVEL", "info").strip().lower() or "info"
    if loglevel not in LOG_LEVELS:
        reader.problems.append(
            f"CELERY_WORKER_LOGLEVEL must be one of {', '.join(LOG_LEVELS)}, got {loglevel!r}"
        )
    expires = reader.count("CELERY_RESULT_EXPIRES", DAY, minimum=0, maximum=30 * DAY)
    timezone = env.get("CELERY_TIMEZONE", "").strip() or "UTC"
    if not _known_timezone(timezone):
        reader.problems.append(f"CELERY_TIMEZONE must be an IANA time zone name, got {timezone!r}")

    worker = role is Role.WORKER
    execution = _read_execution(reader) if worker else _Execution()
    limits = _read_import_limits(reader) if worker else ImportLimits()
    retention = _read_retention(reader) if role is Role.SCHEDULER else Retention()
    flower_auth = reader.credentials("FLOWER_BASIC_AUTH") if role is Role.FLOWER else None
    metrics = _read_metrics(reader) if role.needs_database else None

    if reader.problems:
        raise ConfigError(role, reader.problems)
    return Settings(
        role=role,
        broker_url=broker_url,
        result_backend=result_backend,
        database=database,
        embedded_dir=embedded_dir,
        flower_basic_auth=flower_auth,
        worker_concurrency=execution.concurrency,
        result_expires=expires,
        task_time_limit=execution.time_limit,
        visibility_timeout=execution.visibility_timeout,
        soft_shutdown_seconds=execution.soft_shutdown_seconds,
        worker_loglevel=loglevel,
        redis_key_prefix=env.get("IBUTSU_REDIS_KEY_PREFIX", "").strip(),
        import_limits=limits,
        timezone=timezone,
        retention=retention,
        metrics=metrics,
        redis=redis,
    )
