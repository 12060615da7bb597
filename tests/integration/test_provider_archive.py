"""The provider archive as a wasmCloud 1.x host gets it: built with the CLI, pushed to a real OCI
registry, pulled back, verified, and its executable run with no arguments and an empty environment."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import nats
import nkeys
import pytest

from concordance_provider.oci_registry import Reference, RegistryClient
from concordance_provider.provider_archive import ProviderArchive, read_archive, read_archive_file

from .harness import ProviderProcess, client, eventually, host_data_line, kv_json, nats_server, result, send
from .lattice_stack import registry

pytestmark = pytest.mark.integration

PROVIDER = "VCONCORDANCEPAR"
HOST_ID = "NHOSTPAR"
COMMANDS = Path(__file__).resolve().parents[2] / "examples" / "bankaccount" / "commands"


def _build(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "concordance_provider.cli", "provider-archive", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _check_format(archive: ProviderArchive, issuer_seed: str, subject_seed: str) -> None:
    """Every rule, checked from the seeds with the nkeys package rather than with the code that signed."""
    issuer = nkeys.from_seed(issuer_seed.encode())
    header, body, signature = archive.jwt.split(".")
    assert issuer.verify(f"{header}.{body}".encode(), _unb64(signature))
    claims = json.loads(_unb64(body))
    assert claims["iss"] == issuer.public_key.decode()
    assert claims["sub"].startswith("V") and subject_seed.startswith("SV")
    assert archive.targets == ["x86_64-linux"]
    binary = archive.binaries["x86_64-linux"]
    assert claims["wascap"]["target_hashes"] == {"x86_64-linux": hashlib.sha256(binary).hexdigest().upper()}
    assert binary.startswith(b"#!/bin/sh\n")


def _registry_manifest(address: str, reference: Reference) -> dict:
    request = urllib.request.Request(f"http://{address}/v2/{reference.repository}/manifests/{reference.tag}",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _link(source_id: str, wasm: Path, **values: str) -> dict:
    return {"source_id": source_id, "target": PROVIDER, "name": "default", "wit_namespace": "concordance",
            "wit_package": "eventsourcing", "interfaces": ["aggregate"], "source_config": {},
            "target_config": {"COMPONENT_FILE": str(wasm), **values}, "source_secrets": None, "target_secrets": None}


async def _ask(nc, subject: str, body: object, timeout: float = 30) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (await nc.request(subject, data, timeout=timeout)).data


@dataclass(frozen=True)
class Built:
    output: Path
    pulled: bytes
    issuer_seed: str
    subject_seed: str
    stdout: str

    def executable(self, folder: Path) -> Path:
        """The target's binary where a host puts it (its cache, mode 0755), ready to exec."""
        path = folder / "wasmcloudcache" / "NHOST" / "concordance_0_1_0"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(read_archive(self.pulled).binaries["x86_64-linux"])
        path.chmod(0o755)
        return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """The archive built by the CLI, pushed to a real registry and pulled back from it."""
    folder = tmp_path_factory.mktemp("par")
    output = folder / "concordance.par.gz"
    with registry(folder / "registry") as address:
        reference = Reference.parse(f"{address}/concordance:0.1.0")
        done = _build(folder, "-o", str(output), "--push", str(reference))
        assert done.returncode == 0, done.stderr
        assert f"pushed {reference}" in done.stdout
        pulled = RegistryClient(address, insecure=True).pull_archive(reference)
        manifest = _registry_manifest(address, reference)
    assert manifest["config"]["mediaType"] == "application/vnd.wasmcloud.provider.archive.config"
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        "application/vnd.wasmcloud.provider.archive.layer.v1+par"]
    seeds = [folder / f"concordance_{kind}.nk" for kind in ("account", "service")]
    for path in seeds:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return Built(output, pulled, seeds[0].read_text().strip(), seeds[1].read_text().strip(),
                 done.stdout + done.stderr)


def test_the_archive_from_the_file_and_from_the_registry_keeps_every_rule(built):
    assert built.pulled == built.output.read_bytes()
    for archive in (read_archive_file(built.output), read_archive(built.pulled)):
        _check_format(archive, built.issuer_seed, built.subject_seed)
    assert built.issuer_seed not in built.stdout and built.subject_seed not in built.stdout


def test_a_second_build_signs_with_the_keys_in_the_seed_files(built, tmp_path):
    folder = built.output.parent
    again = _build(tmp_path, "-o", str(tmp_path / "concordance.par"), "--issuer-seed",
                   str(folder / "concordance_account.nk"), "--subject-seed", str(folder / "concordance_service.nk"))
    assert again.returncode == 0, again.stderr
    rebuilt = read_archive_file(tmp_path / "concordance.par")
    assert not rebuilt.compressed
    _check_format(rebuilt, built.issuer_seed, built.subject_seed)
    assert rebuilt.claims.sub == read_archive(built.pulled).claims.sub


async def test_the_executable_serves_the_provider_protocol_with_no_arguments_and_no_environment(
        built, example_components, tmp_path):
    await _serve_the_bank_scenario(built.executable(tmp_path), example_components, tmp_path)


async def _serve_the_bank_scenario(executable: Path, components: dict[str, Path], tmp_path: Path) -> None:
    lattice = f"par{uuid.uuid4().hex[:6]}"
    rpc = f"wasmbus.rpc.{lattice}.{PROVIDER}"
    aggregate = _link("bankaccount-aggregate", components["bankaccount_aggregate"], ROLE="aggregate",
                      INTEREST="bankaccount", NAME="bankaccount", KEY="accountNumber")
    projector = _link("bankaccount-projector", components["bankaccount_projector"], ROLE="projector",
                      NAME="bankaccount_projector", INTEREST="account_created,funds_deposited,funds_withdrawn")
    with nats_server(tmp_path) as server:
        line = host_data_line(server.url, lattice, PROVIDER, [aggregate], host_id=HOST_ID,
                              config={"COMPONENT_DIR": str(components["bankaccount_aggregate"].parent)})
        provider = ProviderProcess(line, tmp_path / "provider.log", command=[str(executable)])
        try:
            provider.wait_ready()
            async with client(server.url) as nc:
                assert json.loads(await _ask(nc, f"{rpc}.health", b"")) == {"healthy": True, "message": None}
                # A host publishes link puts without a reply subject.
                await nc.publish(f"{rpc}.linkdefs.put", json.dumps(projector).encode())
                seqs = [await send(nc, "bankaccount", json.loads((COMMANDS / f"{name}.json").read_text()))
                        for name in ("create_account_cmd", "deposit_cmd_1", "deposit_cmd_2", "withdraw_cmd_1")]
                assert [(await result(nc, seq))["status"] for seq in seqs] == ["accepted"] * 4
                assert (await kv_json(nc, "CC_STATE", "agg.bankaccount.ABC123"))["balance"] == 6000
                assert await eventually(lambda: _projected(nc), 6000) == 6000
                assert await _ask(nc, f"{rpc}.default.shutdown", {"host_id": HOST_ID})  # answered
        finally:
            provider.stop()  # as the host does after the shutdown request: SIGKILL by PID
    assert "Traceback" not in (tmp_path / "provider.log").read_text()


async def _projected(nc):
    try:
        doc = await kv_json(nc, "CC_RM_bankaccount_projector", "balance.ABC123")
    except nats.js.errors.BucketNotFoundError:  # the projector is still starting
        return None
    return doc and doc["balance"]


def test_an_interpreter_that_cannot_run_the_provider_is_refused_before_anything_is_written(tmp_path):
    bare = tmp_path / "bin" / "python"
    bare.parent.mkdir()
    bare.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named concordance_provider' >&2\nexit 1\n")
    bare.chmod(0o755)
    refused = _build(tmp_path, "-o", str(tmp_path / "p.par.gz"), "--python", str(bare))
    assert refused.returncode == 2 and "cannot import concordance_provider" in refused.stderr
    assert "Traceback" not in refused.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_an_interpreter_only_on_the_hosts_is_named_in_a_warning(tmp_path):
    elsewhere = str(tmp_path / "on-the-hosts" / "bin" / "python")
    built = _build(tmp_path, "-o", str(tmp_path / "p.par.gz"), "--python", elsewhere)
    assert built.returncode == 0 and f"warning: {elsewhere} is not on this machine" in built.stderr
    launcher = read_archive_file(tmp_path / "p.par.gz").binaries["x86_64-linux"].decode()
    assert f"PYTHON={elsewhere}\n" in launcher


def test_a_seed_of_the_wrong_kind_is_refused(tmp_path):
    made = _build(tmp_path, "-o", str(tmp_path / "p.par.gz"))
    assert made.returncode == 0, made.stderr
    swapped = _build(tmp_path, "-o", str(tmp_path / "q.par.gz"), "--issuer-seed", str(tmp_path / "p_service.nk"))
    assert swapped.returncode == 2 and "not an account seed" in swapped.stderr
    assert not (tmp_path / "q.par.gz").exists()


def test_a_launcher_without_its_python_says_what_is_missing(tmp_path):
    from concordance_provider.provider_archive import launcher

    script = tmp_path / "provider.bin"
    script.write_bytes(launcher(tmp_path / "gone" / "bin" / "python"))
    script.chmod(0o755)
    done = subprocess.run([str(script)], env={}, input=b"\r\n", capture_output=True, timeout=30)
    assert done.returncode == 127 and b"gone/bin/python on this host" in done.stderr
