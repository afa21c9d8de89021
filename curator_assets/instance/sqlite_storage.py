"""The single-machine instance's SQLite storage, with its connections kept open.

Dagster's SQLite storages (runs, event logs, schedules) build a new SQLAlchemy engine for every
statement batch (``poolclass=NullPool``): each event stored means connecting to the database,
closing it again (a WAL checkpoint attempt on close) and, because SQLAlchemy caches compiled
statements per engine, compiling every INSERT from scratch. A run of 8 shards stores ~110 events
(3 materializations and 3 check results per shard, planned events, step events, a few log
lines), and a materialization cost ~12 ms of CPU on its own and 20-35 ms inside a run on 2 busy
cores (``benchmarks/bench_pipeline.py``): seconds of every run, on the cores the decode needs.

The classes here are the same storages, with the same files, tables and schema (an instance
written by Dagster's own classes is read by these and the other way round); only the connection
handling differs: one engine per database file and process, kept open with a small pool, so
statements are compiled once per process and connections are reused. What it keeps safe:

* **processes**: engines are per process id. A forked child (the warm launcher's run workers)
  never touches its parent's connections; it opens its own and leaves the inherited ones alone,
  neither using nor closing them (SQLite forbids carrying a connection across ``fork``);
* **threads**: Dagster's own lock around event-log connections stays; other connections come
  from the pool, one per thread at a time, and a pool that is busy opens another rather than
  waiting;
* **other processes** (the daemon, the webserver, run workers) see the same WAL-mode database:
  an idle pooled connection holds no lock; every write is its own committed transaction as
  before;
* **many runs**: each run has its own event-log file; engines of the least recently used files
  are closed beyond a small number, so a daemon that reads thousands of runs keeps a bounded set.

The repo's ``dagster.yaml`` selects it through ``InstanceStorage``, which builds it on the Dagster
versions it was tested on and Dagster's own ``DagsterSqliteStorage`` otherwise (same folder)::

    storage:
      custom:
        module: curator_assets.instance.sqlite_storage
        class: InstanceStorage
        config: {base_dir: .dagster_home}  # relative to $DAGSTER_HOME (or the current folder without it)

Clusters use Postgres (``deploy/cluster/dagster.yaml``), whose storage pools its connections
already.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as db
import yaml
from dagster import Field
from dagster._config import StringSource
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sql import create_engine
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClassData
from dagster._utils import mkdir_p

# Dagster's SQLite busy timeout (seconds a writer waits for another process's lock).
BUSY_TIMEOUT_S = 30
# Event-log files (one per run, plus the index) whose engines a process keeps open.
OPEN_FILES = 16

# Engines inherited through fork: kept referenced and never closed, so that the child's garbage
# collector does not close SQLite connections that belong to its parent.
_INHERITED: list[object] = []


class EnginePool:
    """One SQLAlchemy engine per connection string in this process, least recently used closed
    beyond ``most``."""

    def __init__(self, most: int = OPEN_FILES) -> None:
        self._most = most
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._engines: OrderedDict[str, db.engine.Engine] = OrderedDict()

    def engine(self, conn_string: str) -> db.engine.Engine:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's engines are not ours
                _INHERITED.append(self._engines)
                self._engines, self._pid = OrderedDict(), os.getpid()
            engine = self._engines.get(conn_string)
            if engine is None:
                # pool_size: connections kept open; max_overflow=-1: a busy pool opens another
                # connection (closed when returned) instead of making a thread wait.
                engine = create_engine(conn_string, pool_size=2, max_overflow=-1,
                                       connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})
                self._engines[conn_string] = engine
                while len(self._engines) > self._most:
                    _old, evicted = self._engines.popitem(last=False)
                    evicted.dispose()
            self._engines.move_to_end(conn_string)
            return engine

    def dispose(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for engine in self._engines.values():
                    engine.dispose()
            self._engines.clear()


@contextmanager
def _transaction(engine: db.engine.Engine) -> Iterator[db.engine.Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


class _OneKeptEngine:
    """``connect`` through one kept-open engine: the part the pooled run and schedule storages
    share (each is Dagster's class with this mixed in first; one database file each)."""

    _conn_string: str

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(conn_string, inst_data)  # type: ignore[call-arg]
        self._pool = EnginePool(most=1)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: dict):
        return cls.from_local(inst_data=inst_data, **config_value)  # type: ignore[attr-defined]  # builds ``cls``

    @contextmanager
    def connect(self) -> Iterator[db.engine.Connection]:
        with _transaction(self._pool.engine(self._conn_string)) as conn:
            yield conn

    def dispose(self) -> None:
        self._pool.dispose()
        super().dispose()  # type: ignore[misc]


class PooledSqliteRunStorage(_OneKeptEngine, SqliteRunStorage):
    """Dagster's SQLite run storage (``runs.db``) with a kept-open engine."""


class PooledSqliteScheduleStorage(_OneKeptEngine, SqliteScheduleStorage):
    """Dagster's SQLite schedule storage (sensor and schedule ticks) with a kept-open engine."""


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log storage (a file per run, plus ``index.db``) with kept-open
    engines for the most recently used files."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._pool = EnginePool()
        super().__init__(base_dir, inst_data)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: dict):
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[db.engine.Connection]:
        with self._db_lock:  # Dagster's own: its event watcher threads share this storage
            engine = self._pool.engine(self.conn_string_for_shard(shard))
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with _transaction(engine) as conn:
                yield conn

    def dispose(self) -> None:
        self._pool.dispose()
        super().dispose()


class PooledSqliteStorage(DagsterSqliteStorage):
    """The instance's storage: Dagster's SQLite layout under ``base_dir`` (``history/runs.db``,
    ``history/runs/*.db``, ``schedules/schedules.db``), with the pooled classes above."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self.base_dir = base_dir
        self._run_storage = PooledSqliteRunStorage.from_local(os.path.join(base_dir, "history"))
        self._event_log_storage = PooledSqliteEventLogStorage(os.path.join(base_dir, "history", "runs"))
        self._schedule_storage = PooledSqliteScheduleStorage.from_local(os.path.join(base_dir, "schedules"))
        self._inst_data = inst_data
        DagsterStorage.__init__(self)

    @classmethod
    def config_type(cls) -> dict:
        return {"base_dir": Field(StringSource, is_required=False,
                                  description="The storage's folder, relative to $DAGSTER_HOME (default: there).")}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: dict
                          ) -> PooledSqliteStorage:
        base_dir = instance_folder(config_value.get("base_dir"))
        mkdir_p(base_dir)
        return cls(base_dir, inst_data=inst_data)

    @property
    def event_storage_data(self) -> ConfigurableClassData:
        return _data("PooledSqliteEventLogStorage", os.path.join(self.base_dir, "history", "runs"))

    @property
    def run_storage_data(self) -> ConfigurableClassData:
        return _data("PooledSqliteRunStorage", os.path.join(self.base_dir, "history"))

    @property
    def schedule_storage_data(self) -> ConfigurableClassData:
        return _data("PooledSqliteScheduleStorage", os.path.join(self.base_dir, "schedules"))


def _data(class_name: str, base_dir: str) -> ConfigurableClassData:
    return ConfigurableClassData(__name__, class_name, yaml.dump({"base_dir": base_dir}, default_flow_style=False))


def instance_folder(base_dir: str | None) -> str:
    """The storage's folder: ``base_dir`` relative to the folder Dagster read ``dagster.yaml`` from:
    ``$DAGSTER_HOME``, or, without it, the current folder (where ``dg dev``, ``dg check defs`` and
    ``dagster dev`` read it then, beside a temporary instance folder they remove at exit)."""
    if base_dir and os.path.isabs(base_dir):
        return base_dir
    home = os.environ.get("DAGSTER_HOME") or os.getcwd()
    return os.path.join(home, base_dir) if base_dir else home


class InstanceStorage(DagsterSqliteStorage):
    """What ``dagster.yaml`` names: :class:`PooledSqliteStorage` on the tested Dagster versions,
    Dagster's own :class:`DagsterSqliteStorage` otherwise (or with CURATOR_RUN_LAUNCHER=default);
    the same SQLite files either way, under ``base_dir``."""

    @classmethod
    def config_type(cls) -> dict:
        return PooledSqliteStorage.config_type()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: dict) -> DagsterSqliteStorage:
        from curator_assets.instance import accelerated

        if accelerated(say=False):  # the run launcher says it
            return PooledSqliteStorage.from_config_value(inst_data, config_value)
        base_dir = instance_folder(config_value.get("base_dir"))
        mkdir_p(base_dir)
        return DagsterSqliteStorage.from_local(base_dir, inst_data=inst_data)
