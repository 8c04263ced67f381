"""How every role connects to Redis, whatever kind the deployment runs: one server
(``redis://``), TLS (``rediss://``) or a Sentinel group (``sentinel://``). The broker, the
result backend and the scheduler's lease all connect with what is here.

**Bounds on a silent connection** (no FIN, no RST: a middlebox dropped it, a network
partitioned). A command waits at most SOCKET_TIMEOUT for its reply, then fails and its
connection is dropped; a lost connection (not a timeout: on a silent path that would only
double the wait) is tried once more on a new one. A connection idle for HEALTH_CHECK_INTERVAL
is PINGed before its next use; the kernel probes an idle connection after KEEPALIVE_IDLE
seconds and gives up after KEEPALIVE_COUNT unanswered probes KEEPALIVE_INTERVAL apart, and a
write that stays unacknowledged for TCP_USER_TIMEOUT_MS fails. The consumer's blocking fetch
and its pub/sub connection are watched by Kombu's health checks (every HEALTH_CHECK_INTERVAL):
a fetch reply overdue by that much (its wait is 1 s), or two PINGs without a PONG, drop the
connection. A worker sends a heartbeat every HEARTBEAT_SECONDS and gives its broker connection
up when one fails (ibutsu_worker.process.consumer). So a worker notices a silent broker (a command
fails, one log line) within SILENCE_NOTICED_WITHIN (the command may first wait for a new
connection's handshake, then for its own reply), and has given its connection up (and
reconnects, with backoff, until traffic flows) within SILENCE_GIVEN_UP_WITHIN: the commands
in flight at that moment (an acknowledgement, a heartbeat, putting messages back) fail one
after the other, each after SOCKET_TIMEOUT.

**A primary that turned replica** (a managed switch-over: the old primary stays up, read-only,
and open connections keep talking to it) answers writes with ``READONLY``; redis-py raises a
response error, which Celery treats as fatal. :class:`Connection` and :class:`SSLConnection`
drop the connection and raise a connection error instead, so the command is tried again on a
new connection, which the deployment's endpoint sends to the new primary. Sentinel-managed
connections already do the same (redis-py asks the sentinels for the new primary).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from ibutsu_server.settings import RedisSettings, Settings

log = logging.getLogger(__name__)

SOCKET_TIMEOUT = 10.0
HEALTH_CHECK_INTERVAL = 10
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000
# Celery's worker heartbeat (worker_heartbeat is not changed).
HEARTBEAT_SECONDS = 2
SILENCE_NOTICED_WITHIN = HEARTBEAT_SECONDS + 2 * SOCKET_TIMEOUT + 1
SILENCE_GIVEN_UP_WITHIN = HEARTBEAT_SECONDS + 3 * SOCKET_TIMEOUT + 1
# Seconds the start-up check waits for each Redis before leaving it to the role's own retries.
STARTUP_CHECK_TIMEOUT = 5.0

# redis-py sets each of these on its sockets at the TCP level (IPPROTO_TCP).
KEEPALIVE_OPTIONS = {
    socket.TCP_KEEPIDLE: KEEPALIVE_IDLE,
    socket.TCP_KEEPINTVL: KEEPALIVE_INTERVAL,
    socket.TCP_KEEPCNT: KEEPALIVE_COUNT,
    socket.TCP_USER_TIMEOUT: TCP_USER_TIMEOUT_MS,
}


class _ReadOnlyIsReconnect:
    """A ``READONLY`` reply means this server was demoted: reconnect, as for a lost one."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis_errors.ReadOnlyError:
            self.disconnect()  # type: ignore[attr-defined]
            where = f"{getattr(self, 'host', '?')}:{getattr(self, 'port', '?')}"
            log.warning(
                "Redis at %s is a read-only replica now (a switch-over): reconnecting", where
            )
            raise redis_errors.ConnectionError(
                f"Redis at {where} is a read-only replica now: reconnecting to the primary"
            ) from None


class Connection(_ReadOnlyIsReconnect, redis.Connection):
    """redis-py's connection, reconnecting on ``READONLY``."""


class SSLConnection(_ReadOnlyIsReconnect, redis.SSLConnection):
    """redis-py's TLS connection, reconnecting on ``READONLY``."""


def connection_options() -> dict[str, Any]:
    """redis-py connection arguments that bound every wait (see the module's doc), plain
    values: they are also Celery settings, which workers send to whoever asks (Flower). The
    retry of a lost connection (:func:`reconnect_once`) is added where clients are made."""
    return {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "socket_keepalive": True,
        "socket_keepalive_options": KEEPALIVE_OPTIONS,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry_on_timeout": False,
    }


def reconnect_once() -> Retry:
    """One more try, on a new connection, of a command whose connection was lost (a READONLY
    reply included); none of one that timed out."""
    return Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,))


def tls_options(redis_settings: RedisSettings) -> dict[str, Any]:
    """redis-py's TLS arguments: the server's certificate is always verified, against
    IBUTSU_REDIS_TLS_CA_FILE or else the system's CAs; a client certificate if one is set."""
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if redis_settings.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(redis_settings.tls_ca_file)
    if redis_settings.tls_cert_file is not None and redis_settings.tls_key_file is not None:
        options["ssl_certfile"] = str(redis_settings.tls_cert_file)
        options["ssl_keyfile"] = str(redis_settings.tls_key_file)
    return options


def sentinel_options(redis_settings: RedisSettings) -> dict[str, Any]:
    """What Kombu and Celery need for a ``sentinel://`` URL: the master's name and how to
    talk to the sentinels themselves (their own password, the same bounds)."""
    sentinel_kwargs: dict[str, Any] = {
        key: value
        for key, value in connection_options().items()
        if key.startswith(("socket_", "retry_"))
    }
    if redis_settings.sentinel_password:
        sentinel_kwargs["password"] = redis_settings.sentinel_password
    return {"master_name": redis_settings.sentinel_master, "sentinel_kwargs": sentinel_kwargs}


def _parts(url: str) -> Iterator[tuple[str, str, int | None, str | None, str | None, int]]:
    """(scheme, host, port, username, password, db) of each URL in a Celery 'url;url' list."""
    for part in url.split(";"):
        parsed = urlsplit(part)
        db = parsed.path.strip("/")
        yield (
            parsed.scheme,
            parsed.hostname or "localhost",
            parsed.port,
            unquote(parsed.username) if parsed.username else None,
            unquote(parsed.password) if parsed.password else None,
            int(db) if db.isdigit() else 0,
        )


def addresses(url: str) -> str:
    """The servers ``url`` names, as ``host:port`` (a Sentinel list's sentinels), safe to print:
    no user name or password."""
    named = [
        f"{host}:{port or (26379 if scheme == 'sentinel' else 6379)}"
        for scheme, host, port, *_rest in _parts(url)
    ]
    return ("sentinels " if url.startswith("sentinel://") else "") + ", ".join(named)


def client(url: str, redis_settings: RedisSettings, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url`` of any kind, with the bounds and TLS options above.
    ``kwargs`` go to the client (``decode_responses=True``, say)."""
    parts = list(_parts(url))
    scheme, host, port, username, password, db = parts[0]
    options = {
        **connection_options(),
        "retry": reconnect_once(),
        **kwargs,
        "username": username,
        "password": password,
    }
    if scheme == "sentinel":
        sentinel = sentinel_options(redis_settings)
        manager = Sentinel(  # type: ignore[no-untyped-call]
            [(p[1], p[2] or 26379) for p in parts],
            sentinel_kwargs=sentinel["sentinel_kwargs"],
            **options,
        )
        primary: redis.Redis = manager.master_for(sentinel["master_name"], db=db)  # type: ignore[no-untyped-call]
        return primary
    connection_class: type[redis.Connection] = Connection
    if scheme == "rediss":
        connection_class = SSLConnection
        options |= tls_options(redis_settings)
    pool = redis.ConnectionPool(
        connection_class=connection_class, host=host, port=port or 6379, db=db, **options
    )
    return redis.Redis(connection_pool=pool)


def startup_problems(settings: Settings) -> list[str]:
    """What a connection to each of the role's Redis servers says is wrong with the
    configuration itself: a certificate that does not verify, a refused password. Retrying
    cannot mend those, so the role should not start. An unreachable server is no problem
    here: the role waits for it. A Sentinel group is asked about its master first."""
    problems: list[str] = []
    names_by_url: dict[str, list[str]] = {}
    for name, url in settings.redis_urls.items():
        names_by_url.setdefault(url, []).append(name)
    bounded = dict.fromkeys(("socket_timeout", "socket_connect_timeout"), STARTUP_CHECK_TIMEOUT)
    for url, names in names_by_url.items():
        name = ", ".join(names)
        if url.startswith("sentinel://"):
            found = _sentinel_problems(url, settings.redis, bounded)
            problems.extend(f"{name}: {problem}" for problem in found)
            if found:
                continue
        probe = client(url, settings.redis, **bounded)
        try:
            probe.ping()
        except redis_errors.AuthenticationError:
            problems.append(f"{name}: Redis refused the user name or password")
        except redis_errors.ConnectionError as exc:
            if _certificate_refused(exc):
                problems.append(
                    f"{name}: the server's TLS certificate does not verify against "
                    f"{settings.redis.tls_ca_file or 'the system CAs'} (IBUTSU_REDIS_TLS_CA_FILE)"
                )
            elif "SSL" in str(exc) or isinstance(exc.__cause__, ssl.SSLError):
                problems.append(f"{name}: the TLS handshake failed ({_reason(exc)})")
        except redis_errors.RedisError:
            pass
        finally:
            probe.close()
            probe.connection_pool.disconnect()
    return problems


def _sentinel_problems(
    url: str, redis_settings: RedisSettings, bounded: dict[str, float]
) -> list[str]:
    """What the sentinels of ``url`` say is wrong: a password they refuse, a master none of
    them watches. Sentinels that do not answer are no problem here (others may)."""
    options = {**sentinel_options(redis_settings)["sentinel_kwargs"], **bounded}
    refused, watched, answered = [], set(), False
    for _scheme, host, port, *_rest in _parts(url):
        with redis.Redis(host=host, port=port or 26379, **options) as sentinel:
            try:
                watched |= set(sentinel.sentinel_masters())
                answered = True
            except redis_errors.AuthenticationError:
                refused.append(f"{host}:{port or 26379}")
            except redis_errors.RedisError:
                continue
    problems = []
    if refused:
        problems.append(
            f"sentinel {', '.join(refused)} refused the password (IBUTSU_REDIS_SENTINEL_PASSWORD)"
        )
    master = redis_settings.sentinel_master
    if answered and master not in watched:
        problems.append(
            f"the sentinels watch no master named {master!r} (IBUTSU_REDIS_SENTINEL_MASTER)"
        )
    return problems


def _certificate_refused(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text[text.find("[") :] if "[" in text else text[:200]
