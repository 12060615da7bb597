"""The same bank deposits on pyeventsourcing with its SQLite recorder: what a Python user would pick instead.

A ``BankAccount`` aggregate (created, then deposits that add their amount) in an ``Application`` whose
events are stored by ``eventsourcing.sqlite`` in a database file, with the library's defaults (no
snapshots, no aggregate cache). pyeventsourcing is synchronous, so concurrent commands are served the
way a threaded web server would serve them: a pool of threads, each calling the application; a
command that loses an optimistic-concurrency race on its account (``RecordConflictError``) is retried
on fresh state, as a request handler would.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import RecordConflictError

MAX_ATTEMPTS = 1000  # a command that loses this many races in a row fails the bench
SEED_CHUNK = 1000  # events saved per transaction when building a long history


class BankAccount(Aggregate):
    @staticmethod
    def create_id(account_number: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"bankaccount/{account_number}")

    @event("AccountCreated")
    def __init__(self, account_number: str, initial_balance: int, min_balance: int, customer_id: str) -> None:
        self.account_number = account_number
        self.balance = initial_balance
        self.min_balance = min_balance
        self.customer_id = customer_id

    def deposit(self, amount: int, note: str) -> None:
        """The daemon's rule: a deposit of a positive amount adds it to the balance."""
        if amount <= 0:
            raise ValueError(f"amount must be positive, got {amount}")
        self._funds_deposited(amount, note)

    @event("FundsDeposited")
    def _funds_deposited(self, amount: int, note: str) -> None:
        self.balance += amount


class Bank(Application[UUID]):
    def open_account(self, account_number: str, initial_balance: int) -> None:
        self.save(BankAccount(account_number, initial_balance, 0, "bench"))

    def deposit(self, account_number: str, amount: int, note: str) -> int:
        account: BankAccount = self.repository.get(BankAccount.create_id(account_number))
        account.deposit(amount, note)
        self.save(account)
        return account.balance

    def balance(self, account_number: str) -> int:
        account: BankAccount = self.repository.get(BankAccount.create_id(account_number))
        return account.balance


def open_bank(db_path: Path) -> Bank:
    """An application on its own SQLite file (WAL mode, as the library sets it)."""
    return Bank(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(db_path)})


@dataclass
class PeerRun:
    count: int
    seconds: float
    latencies: list[float]  # seconds per command, retries included
    conflicts: int  # races lost and retried

    @property
    def rate(self) -> float:
        return self.count / self.seconds


class _Server:
    """Runs commands on ``threads`` worker threads, retrying a lost race on fresh state."""

    def __init__(self, bank: Bank) -> None:
        self.bank = bank
        self.conflicts = 0
        self._lock = threading.Lock()

    def deposit(self, key: str, amount: int, note: str) -> float:
        started = time.perf_counter()
        for _ in range(MAX_ATTEMPTS):
            try:
                self.bank.deposit(key, amount, note)
                return time.perf_counter() - started
            except RecordConflictError:
                with self._lock:
                    self.conflicts += 1
        raise RuntimeError(f"a deposit on {key} lost {MAX_ATTEMPTS} races in a row")


def run_deposits(bank: Bank, plan: list[tuple[str, int]], threads: int, timeout: float) -> PeerRun:
    """Every deposit of ``plan`` with ``threads`` in flight; each thread takes the next when done.

    A thread pool is how a threaded web server (gunicorn's gthread workers, a Flask or Django dev
    server) serves concurrent requests with a synchronous library: one request per thread.
    """
    server = _Server(bank)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="peer") as pool:
        futures = [pool.submit(server.deposit, key, amount, f"bench {i}") for i, (key, amount) in enumerate(plan)]
        latencies = [future.result(timeout=max(timeout - (time.perf_counter() - started), 0.1))
                     for future in futures]
    return PeerRun(len(plan), time.perf_counter() - started, latencies, server.conflicts)


def round_trips(bank: Bank, key: str, count: int) -> list[float]:
    """``count`` deposits one at a time on ``key``; seconds each."""
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        bank.deposit(key, 1, f"rt {n}")
        latencies.append(time.perf_counter() - started)
    return latencies


def seed_history(bank: Bank, key: str, events: int) -> None:
    """``events`` deposits on ``key``, saved ``SEED_CHUNK`` per transaction."""
    account: BankAccount = bank.repository.get(BankAccount.create_id(key))
    for n in range(events):
        account.deposit(1, f"history {n}")
        if (n + 1) % SEED_CHUNK == 0 or n + 1 == events:
            bank.save(account)


def database_size(db_path: Path) -> int:
    return sum(os.path.getsize(p) for p in db_path.parent.glob(db_path.name + "*"))
