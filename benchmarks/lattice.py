"""The same bank scenario with components in-process and on a real wasmCloud 2 host, in one run.

For each runtime, on its own fresh loopback nats-server and daemon:

* round trip: deposits on one account sent one at a time, each timed from the send until its
  outcome is in CC_RESULTS (median and 90th percentile);
* throughput: deposits spread over many accounts with 32 in flight, until every outcome is in.

The wasmCloud side runs Debian's docker-registry, `wash host` and `concordance deploy`, exactly as
the integration tests do. Figures to quote are the ratios wasmCloud / in-process of the same run.

Run: ``.venv/bin/python -m benchmarks.lattice [--round-trips N --commands N --keys K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import nats

from benchmarks.bench import (
    AGGREGATE,
    MANIFEST,
    PUBLISH_TIMEOUT,
    ROOT,
    BenchFailed,
    Options,
    Outcomes,
    deposit,
    measure_deposits,
    stop_daemon,
    tail,
    wait_until_ready,
)
from concordance_provider.logging import configure as configure_logging
from concordance_provider.naming import command_subject
from concordance_provider.nats_server import EmbeddedNatsServer, free_port
from tests.integration.lattice_stack import WashHost, registry


@dataclass(frozen=True)
class Figures:
    runtime: str
    median_ms: float
    p90_ms: float
    throughput: float


def _daemon(nats_url: str, log_path: Path, manifest: Path | None) -> subprocess.Popen[bytes]:
    where = [str(manifest)] if manifest else ["--lattice", "default"]
    command = [sys.executable, "-m", "concordance_provider.cli", "up", *where, "--nats-url", nats_url,
               "--log-level", "warning"]
    with log_path.open("wb") as log_file:
        return subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)


def _deploy(nats_url: str, registry_address: str, host_id: str, log_path: Path) -> None:
    with log_path.open("wb") as log_file:
        done = subprocess.run([sys.executable, "-m", "concordance_provider.cli", "deploy", str(MANIFEST),
                               "--registry", registry_address, "--nats-url", nats_url, "--host-id", host_id,
                               "--log-level", "warning"], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                              timeout=900)
    if done.returncode != 0:
        raise BenchFailed(f"concordance deploy failed:\n{tail(log_path)}")


async def _round_trips(nats_url: str, daemon: subprocess.Popen[bytes], opts: Options, count: int,
                       keys: int, commands: int) -> tuple[list[float], float]:
    tag = uuid.uuid4().hex[:8]
    nc = await nats.connect(nats_url, max_reconnect_attempts=3, connect_timeout=5)
    try:
        js = nc.jetstream()
        await wait_until_ready(nc, daemon, opts, tag)
        outcomes = Outcomes(nc)
        await outcomes.start()
        try:
            account = f"rt-{tag}"
            await measure_deposits(js, outcomes, opts, [account], 1, "warm-up")
            latencies = []
            for n in range(count):
                started = time.perf_counter()
                ack = await js.publish(command_subject(AGGREGATE), deposit(account, 1, f"rt {n}"), timeout=PUBLISH_TIMEOUT)
                await outcomes.wait_for([ack.seq], opts.phase_timeout)
                latencies.append(time.perf_counter() - started)
            outcomes.check_accepted([ack.seq], "round trips")
            multi = await measure_deposits(js, outcomes, opts, [f"tp-{tag}-{i}" for i in range(keys)], commands,
                                           "throughput")
        finally:
            await outcomes.stop()
        return latencies, multi.rate
    finally:
        await nc.close()


def _measure(runtime: str, workdir: Path, args: argparse.Namespace, opts: Options) -> Figures:
    with ExitStack() as stack:
        server = EmbeddedNatsServer(workdir / "nats", free_port(), name=f"bench-{runtime}")
        server.start()
        stack.callback(server.stop)
        manifest: Path | None = MANIFEST
        if runtime == "wasmcloud":
            address = stack.enter_context(registry(workdir / "registry"))
            host = WashHost(server.url, workdir / "wash")
            stack.callback(host.stop)
            manifest = None
        daemon = _daemon(server.url, workdir / "daemon.log", manifest)
        stack.callback(stop_daemon, daemon)
        if runtime == "wasmcloud":
            _deploy(server.url, address, host.host_id, workdir / "deploy.log")
        try:
            latencies, rate = asyncio.run(asyncio.wait_for(
                _round_trips(server.url, daemon, opts, args.round_trips, args.keys, args.commands), opts.overall_timeout))
        except (BenchFailed, asyncio.TimeoutError) as exc:
            raise BenchFailed(f"{runtime}: {exc}\n{tail(workdir / 'daemon.log')}") from None
    ordered = sorted(latencies)
    return Figures(runtime, statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.9)] * 1000, rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=100)
    parser.add_argument("--commands", type=int, default=600)
    parser.add_argument("--keys", type=int, default=20)
    args = parser.parse_args(argv)
    configure_logging("warning")
    opts = Options(raw_messages=1, commands=args.commands, keys=args.keys, single_key_commands=1, concurrency=32,
                   ready_timeout=300, phase_timeout=300, overall_timeout=900)
    try:
        with tempfile.TemporaryDirectory(prefix="concordance-lattice-bench-") as tmp:
            local = _measure("in-process", Path(tmp) / "local", args, opts)
            remote = _measure("wasmcloud", Path(tmp) / "remote", args, opts)
    except BenchFailed as exc:
        print(f"bench FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"{'runtime':<12}{'rt p50 ms':>11}{'rt p90 ms':>11}{'cmd/s':>9}")
    for row in (local, remote):
        print(f"{row.runtime:<12}{row.median_ms:>11.1f}{row.p90_ms:>11.1f}{row.throughput:>9.0f}")
    print(f"lattice bench: round trip x{remote.median_ms / local.median_ms:.2f} "
          f"({remote.median_ms:.1f} vs {local.median_ms:.1f} ms median), throughput x{remote.throughput / local.throughput:.2f} "
          f"({remote.throughput:.0f} vs {local.throughput:.0f} commands/s over {args.keys} accounts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
