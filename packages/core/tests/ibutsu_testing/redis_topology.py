"""Redis deployments of a test's own, as production runs them: a primary with a replica watched
by three sentinels (``redis-server --sentinel``), passwords on both (distinct), and TLS with
certificates made here by ``openssl``. Every process is a child of the test (it dies with it),
on free ports, in a folder removed afterwards; the machine's Redis is never touched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ibutsu_testing.services import DIE_WITH_PARENT, free_port, wait_for

MASTER = "ibutsu-primary"
REDIS_PASSWORD = "redis-pw-2718281828"
SENTINEL_PASSWORD = "sentinel-pw-3141592653"
# Sentinel's own pace, made quick for tests: a primary silent for a second is down.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 10000


@dataclass
class RedisProcess:
    """One ``redis-server`` (data node or sentinel) with its arguments."""

    port: int
    folder: Path
    args: list[str]
    sentinel: bool = False
    process: subprocess.Popen[bytes] | None = None
    password: str | None = None

    def start(self) -> None:
        log = (self.folder / f"{self.port}.log").open("ab")
        command = ["redis-server", *self.args]
        if self.sentinel:
            command = [
                "redis-server",
                str(self.folder / f"sentinel-{self.port}.conf"),
                "--sentinel",
            ]
        self.process = subprocess.Popen(
            [*DIE_WITH_PARENT, *command], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for(self.pings, timeout=30, interval=0.05)

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=5, decode_responses=True
        )

    def pings(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crashed host, a lost node."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def role(self) -> str:
        with self.client() as client:
            return str(client.info("replication")["role"])


def _node(folder: Path, *extra: str) -> RedisProcess:
    port = free_port()
    data = folder / str(port)
    data.mkdir()
    args = [
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--requirepass", REDIS_PASSWORD, "--masterauth", REDIS_PASSWORD, *extra,
    ]  # fmt: skip
    return RedisProcess(port, folder, args, password=REDIS_PASSWORD)


@dataclass
class SentinelGroup:
    """A primary, its replica and three sentinels. ``urls`` is what a role's
    ``CELERY_BROKER_URL`` holds; ``env`` the variables that go with it."""

    folder: Path
    nodes: list[RedisProcess] = field(default_factory=list)
    sentinels: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return ";".join(
            f"sentinel://:{REDIS_PASSWORD}@127.0.0.1:{s.port}/0" for s in self.sentinels
        )

    @property
    def env(self) -> dict[str, str]:
        return {
            "CELERY_BROKER_URL": self.url,
            "CELERY_RESULT_BACKEND": self.url.replace("/0", "/1"),
            "IBUTSU_REDIS_SENTINEL_MASTER": MASTER,
            "IBUTSU_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        }

    def primary(self) -> RedisProcess:
        """The node the sentinels name as primary now."""
        with self.sentinels[0].client() as client:
            host, port = client.sentinel_get_master_addr_by_name(MASTER)
        return next(node for node in self.nodes if node.port == int(port))

    def replicas_in_sync(self) -> bool:
        with self.primary().client() as client:
            info = client.info("replication")
        return int(info.get("connected_slaves", 0)) == len(self.nodes) - 1 and all(
            info[f"slave{i}"]["state"] == "online" for i in range(len(self.nodes) - 1)
        )

    def all_sentinels_agree_on(self, port: int) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                _host, found = client.sentinel_get_master_addr_by_name(MASTER)
            if int(found) != port:
                return False
        return True


@contextmanager
def sentinel_group() -> Iterator[SentinelGroup]:
    """A running :class:`SentinelGroup`, replica in sync, every sentinel aware of the others."""
    folder = Path(tempfile.mkdtemp(prefix="ibutsu-sentinel-"))
    group = SentinelGroup(folder)
    try:
        primary = _node(folder)
        primary.start()
        replica = _node(folder, "--replicaof", "127.0.0.1", str(primary.port))
        replica.start()
        group.nodes = [primary, replica]
        for _ in range(3):
            port = free_port()
            (folder / f"sentinel-{port}.conf").write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"requirepass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
                f"sentinel auth-pass {MASTER} {REDIS_PASSWORD}\n"
                f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            sentinel = RedisProcess(port, folder, [], sentinel=True, password=SENTINEL_PASSWORD)
            sentinel.start()
            group.sentinels.append(sentinel)
        wait_for(group.replicas_in_sync, timeout=30, interval=0.1)
        wait_for(lambda: _sentinels_know_each_other(group), timeout=30, interval=0.2)
        yield group
    finally:
        for process in [*group.sentinels, *group.nodes]:
            process.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _sentinels_know_each_other(group: SentinelGroup) -> bool:
    for sentinel in group.sentinels:
        with sentinel.client() as client:
            master = client.sentinel_master(MASTER)
        if int(master.get("num-other-sentinels", 0)) < len(group.sentinels) - 1:
            return False
        if int(master.get("num-slaves", 0)) < len(group.nodes) - 1:
            return False
    return True


@contextmanager
def replicated_pair() -> Iterator[tuple[RedisProcess, RedisProcess]]:
    """A primary and its replica, no sentinels: what a managed Redis runs behind its endpoint
    (the test moves the endpoint, a proxy, on a switch-over)."""
    folder = Path(tempfile.mkdtemp(prefix="ibutsu-pair-"))
    nodes: list[RedisProcess] = []
    try:
        primary = _node(folder)
        primary.start()
        nodes.append(primary)
        replica = _node(folder, "--replicaof", "127.0.0.1", str(primary.port))
        replica.start()
        nodes.append(replica)
        wait_for(lambda: _replica_online(primary), timeout=30, interval=0.1)
        yield primary, replica
    finally:
        for process in nodes:
            process.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _replica_online(primary: RedisProcess) -> bool:
    with primary.client() as client:
        info = client.info("replication")
    return int(info.get("connected_slaves", 0)) == 1 and info["slave0"]["state"] == "online"


def switch_over(primary: RedisProcess, replica: RedisProcess) -> None:
    """What a managed service does: writes paused on the primary until the replica has all of
    them, the replica promoted, the old primary made its replica; clients connected to the old
    primary stay connected (and now get ``READONLY``)."""
    with primary.client() as old, replica.client() as new:
        old.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        offset = int(old.info("replication")["master_repl_offset"])
        wait_for(
            lambda: int(new.info("replication").get("slave_repl_offset", -1)) >= offset,
            timeout=10,
            interval=0.01,
        )
        new.execute_command("REPLICAOF", "NO", "ONE")
        old.execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
        old.execute_command("CLIENT", "UNPAUSE")


@dataclass
class Certificates:
    """A CA, a server certificate for 127.0.0.1 it signed, a client certificate it signed,
    and a second CA that signed nothing of these (the wrong one)."""

    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


@contextmanager
def certificates() -> Iterator[Certificates]:
    """Certificates made now by ``openssl`` (EC keys: fast), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ibutsu-tls-"))
    try:
        for ca in ("ca", "wrong-ca"):
            _openssl(folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
                     "-subj", f"/CN=ibutsu test {ca}")  # fmt: skip
        (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        for name in ("server", "client"):
            _openssl(folder, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                     "-subj", f"/CN=ibutsu test {name}")  # fmt: skip
            _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt",
                     "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                     "-extfile", "san.ext")  # fmt: skip
        for key in folder.glob("*.key"):
            os.chmod(key, 0o600)
        yield Certificates(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def tls_redis(certs: Certificates, *, client_certificates: bool) -> Iterator[RedisProcess]:
    """A redis-server that speaks only TLS, with the certificate ``certs`` made; it asks for
    a client certificate signed by the same CA if ``client_certificates``."""
    folder = Path(tempfile.mkdtemp(prefix="ibutsu-tls-redis-"))
    port = free_port()
    args = [
        "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
        "--save", "", "--appendonly", "no",
        "--tls-cert-file", str(certs.path("server.crt")),
        "--tls-key-file", str(certs.path("server.key")),
        "--tls-ca-cert-file", str(certs.path("ca.crt")),
        "--tls-auth-clients", "yes" if client_certificates else "no",
        "--requirepass", REDIS_PASSWORD,
    ]  # fmt: skip
    server = _TlsRedis(port, folder, args, password=REDIS_PASSWORD, certs=certs)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _TlsRedis(RedisProcess):
    certs: Certificates | None = None

    def client(self) -> redis.Redis:
        assert self.certs is not None
        return redis.Redis(
            port=self.port,
            password=self.password,
            socket_timeout=5,
            decode_responses=True,
            ssl=True,
            ssl_ca_certs=str(self.certs.path("ca.crt")),
            ssl_certfile=str(self.certs.path("client.crt")),
            ssl_keyfile=str(self.certs.path("client.key")),
        )
