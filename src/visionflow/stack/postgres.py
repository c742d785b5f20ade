"""PostgreSQL for the stack: one cluster under `.cache/stack/postgres`, TCP only (no Unix
socket), password (SCRAM) authentication, run as an unprivileged user (PostgreSQL refuses
root: as root it runs as `postgres`, or `VFLOW_PG_USER`).

Databases and roles: `mlflow` (owned by role `mlflow`: MLflow's backend store), `prefect`
(owned by role `prefect`: the Prefect server), `optuna` (owned by role `optuna`: the studies
of `vflow tune`, shared by every host), and role `registry_lock`, which may only connect to
`mlflow` and take the advisory lock that serialises registrations.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from visionflow.stack.procs import StackError, tcp_answers

ADMIN = "vflow_admin"
# role -> the database it owns
ROLES = {"mlflow": "mlflow", "prefect": "prefect", "optuna": "optuna"}
LOCK_ROLE = "registry_lock"
LOCK_DB = "mlflow"


def _version(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.parent.parent.name)) or (0,)


def pg_bin(name: str) -> Path:
    """A PostgreSQL program: from `VFLOW_PG_BIN`, Debian's /usr/lib/postgresql/<v>/bin
    (newest first), then PATH."""
    if env := os.environ.get("VFLOW_PG_BIN"):
        path = Path(env) / name
        if not path.is_file():
            raise StackError(f"VFLOW_PG_BIN={env}: no {name} there")
        return path
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=_version,
                   reverse=True)
    if found:
        return found[0]
    if which := shutil.which(name):
        return Path(which)
    raise StackError(f"PostgreSQL's {name} not found: install PostgreSQL (Debian: apt-get "
                     "install postgresql) or set VFLOW_PG_BIN to its bin folder")


def run_as() -> str | None:
    """The user PostgreSQL runs as: None (this user) unless we are root."""
    if os.geteuid() != 0:
        return None
    user = os.environ.get("VFLOW_PG_USER", "postgres")
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise StackError(f"running as root: PostgreSQL needs an unprivileged user, and "
                         f"'{user}' does not exist (create it, or set VFLOW_PG_USER)") from None
    return user


@dataclass(frozen=True)
class Cluster:
    data: Path
    log: Path
    pwfile: Path
    host: str
    port: int

    def url(self, role: str, password: str, db: str, driver: str = "postgresql") -> str:
        return (f"{driver}://{quote(role, safe='')}:{quote(password, safe='')}@"
                f"{self.host}:{self.port}/{db}")

    # ------------------------------------------------------------------ lifecycle

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                                  user=run_as(), cwd="/")
        except subprocess.TimeoutExpired:
            raise StackError(f"{Path(args[0]).name} timed out after {timeout:.0f} s; "
                             f"log {self.log}") from None

    def _own(self, *paths: Path) -> None:
        """Hand the cluster's files to the user PostgreSQL runs as."""
        user = run_as()
        if user is None:
            return
        info = pwd.getpwnam(user)
        for p in paths:
            os.chown(p, info.pw_uid, info.pw_gid)

    def _check_reachable(self) -> None:
        user = run_as()
        if user is None:
            return
        probe = subprocess.run(["test", "-w", str(self.data)], user=user, cwd="/")
        if probe.returncode != 0:
            raise StackError(f"{self.data}: user '{user}' (PostgreSQL) cannot reach it; let it "
                             "traverse the parent folders (chmod o+x) or run as that user")

    @property
    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self, admin_password: str) -> None:
        """initdb: an empty cluster whose superuser is `vflow_admin` (password auth)."""
        self.data.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        self.data.chmod(0o700)
        self._own(self.data, self.log)
        self._check_reachable()
        pwfile = self.pwfile
        pwfile.write_text(admin_password + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        try:
            proc = self._run(str(pg_bin("initdb")), "-D", str(self.data), "-U", ADMIN,
                             f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8",
                             "--locale=C", "--no-sync")
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise StackError(f"initdb {self.data} failed: {_last(proc)}")
        with open(self.data / "pg_hba.conf", "a") as f:  # hosts on our own subnets too
            f.write("host all all samenet scram-sha-256\n")

    def start(self, timeout: float = 60) -> None:
        self._check_reachable()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        self._own(self.log)
        opts = (f"-c listen_addresses={self.host} -c port={self.port} "
                "-c unix_socket_directories='' -c max_connections=200")
        proc = self._run(str(pg_bin("pg_ctl")), "-D", str(self.data), "-l", str(self.log),
                         "-w", "-t", str(int(timeout)), "-o", opts, "start",
                         timeout=timeout + 10)
        if proc.returncode != 0 or not tcp_answers(self.host, self.port):
            raise StackError(f"PostgreSQL did not start on {self.host}:{self.port}: "
                             f"{_last(proc)}; log {self.log}")

    def stop(self, mode: str = "fast", timeout: float = 60) -> bool:
        if self.pid() is None:
            return False
        proc = self._run(str(pg_bin("pg_ctl")), "-D", str(self.data), "-m", mode, "-w",
                         "-t", str(int(timeout)), "stop", timeout=timeout + 10)
        if proc.returncode != 0 and self.pid() is not None:
            raise StackError(f"pg_ctl stop {self.data} failed: {_last(proc)}")
        return True

    def pid(self) -> int | None:
        """The postmaster's pid when it runs (from postmaster.pid)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    # ------------------------------------------------------------------ roles and databases

    def provision(self, admin_password: str, passwords: dict[str, str]) -> None:
        """Create the roles and databases that are missing; (re)set their passwords."""
        import psycopg
        from psycopg import sql

        conn = psycopg.connect(self.url(ADMIN, admin_password, "postgres"), connect_timeout=10,
                               autocommit=True)
        try:
            with conn.cursor() as cur:
                for role in (*ROLES, LOCK_ROLE):
                    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                    verb = "ALTER" if cur.fetchone() else "CREATE"
                    cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(passwords[role])))
                for role, db in ROLES.items():
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if not cur.fetchone():
                        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(db), sql.Identifier(role)))
                    if db != LOCK_DB:
                        cur.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
                            sql.Identifier(db)))
        finally:
            conn.close()
        # Prefect's migrations create pg_trgm (a trusted extension: the owner may)
        conn = psycopg.connect(self.url(ADMIN, admin_password, "prefect"), connect_timeout=10,
                               autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        finally:
            conn.close()


def _last(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def remove(data: Path) -> None:
    """Delete a cluster's files (after `stop`)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(data)
