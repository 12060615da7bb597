"""Provider archives and their nkeys: the rules of wasmCloud's PAR format, built and read back."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import stat
import tarfile
import time
from pathlib import Path

import nkeys
import pytest

from concordance_provider.oci_registry import PAR_CONFIG_MEDIA_TYPE, PAR_LAYER_MEDIA_TYPE, Reference, par_manifest
from concordance_provider.provider_archive import (
    ArchiveError,
    ProviderClaims,
    build_archive,
    check_interpreter,
    encode_claims,
    launcher,
    read_archive,
    verify_claims,
)
from concordance_provider.signing_keys import KeyKind, NKeyError, SigningKey, verify

BINARY = b"#!/bin/sh\nexit 0\n"


@pytest.fixture(scope="module")
def keys() -> tuple[SigningKey, SigningKey]:
    return SigningKey.generate(KeyKind.ACCOUNT), SigningKey.generate(KeyKind.SERVICE)


def _archive(keys, compress=True, **extra) -> bytes:
    issuer, subject = keys
    return build_archive({"x86_64-linux": BINARY}, issuer, subject, name="Concordance", vendor="Concordance",
                         version="0.1.0", revision=2, compress=compress, **extra)


def _members(data: bytes) -> dict[str, tarfile.TarInfo]:
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name: m for m in tar}


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _files(data: bytes) -> dict[str, bytes]:
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# nkeys


def test_account_keys_agree_with_the_nkeys_package(keys):
    issuer, _ = keys
    theirs = nkeys.from_seed(issuer.seed.encode())
    assert issuer.seed.startswith("SA") and issuer.public_key.startswith("A")
    assert theirs.public_key.decode() == issuer.public_key
    assert theirs.sign(b"claims") == issuer.sign(b"claims")


def test_service_keys_round_trip_through_their_seed(keys):
    _, subject = keys
    assert subject.seed.startswith("SV") and subject.public_key.startswith("V") and len(subject.public_key) == 56
    again = SigningKey.from_seed(subject.seed, KeyKind.SERVICE)
    assert again.public_key == subject.public_key
    assert verify(subject.public_key, b"data", again.sign(b"data"))
    assert not verify(subject.public_key, b"other", again.sign(b"data"))


def test_a_seed_of_the_wrong_kind_or_corrupt_is_refused_by_name(keys):
    issuer, subject = keys
    with pytest.raises(NKeyError, match=r"SV\.\.\.\), not an account seed \(SA"):
        SigningKey.from_seed(subject.seed, KeyKind.ACCOUNT)
    corrupt = issuer.seed[:10] + ("A" if issuer.seed[10] != "A" else "B") + issuer.seed[11:]
    with pytest.raises(NKeyError, match="checksum"):
        SigningKey.from_seed(corrupt, KeyKind.ACCOUNT)
    with pytest.raises(NKeyError, match="not an nkey seed"):
        SigningKey.from_seed(issuer.public_key, KeyKind.ACCOUNT)


def test_seed_files_are_private_and_never_overwritten(keys, tmp_path):
    issuer, _ = keys
    path = tmp_path / "issuer.nk"
    issuer.write_seed(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.from_file(path, KeyKind.ACCOUNT).public_key == issuer.public_key
    with pytest.raises(FileExistsError):
        SigningKey.generate(KeyKind.ACCOUNT).write_seed(path)
    assert issuer.seed not in repr(issuer) and issuer.public_key in repr(issuer)


# the archive's layout and claims


def test_the_archive_holds_the_claims_and_one_executable_per_target(keys):
    compressed = _archive(keys)
    assert compressed[:2] == b"\x1f\x8b"
    members = _members(compressed)
    assert list(members) == ["claims.jwt", "x86_64-linux.bin"]
    assert members["x86_64-linux.bin"].mode == 0o755 and members["x86_64-linux.bin"].isfile()
    plain = _archive(keys, compress=False)
    assert plain[:2] != b"\x1f\x8b" and list(_members(plain)) == ["claims.jwt", "x86_64-linux.bin"]


def test_the_claims_are_wascaps_provider_claims_signed_by_the_issuer(keys):
    issuer, subject = keys
    before = int(time.time())
    jwt = _files(_archive(keys))["claims.jwt"].decode()
    header, body, signature = jwt.split(".")
    assert json.loads(_unb64(header)) == {"typ": "jwt", "alg": "Ed25519"}
    claims = json.loads(_unb64(body))
    assert list(claims) == ["jti", "iat", "iss", "sub", "wascap", "wascap_revision"]  # wascap's order
    assert claims["iss"] == issuer.public_key and claims["sub"] == subject.public_key
    assert claims["wascap_revision"] == 3 and before <= claims["iat"] <= time.time() + 1
    assert claims["wascap"] == {"name": "Concordance", "vendor": "Concordance", "rev": 2, "ver": "0.1.0",
                                "target_hashes": {"x86_64-linux": hashlib.sha256(BINARY).hexdigest().upper()}}
    # Verified with the nkeys package from the issuer's seed, not with the code that signed it.
    assert nkeys.from_seed(issuer.seed.encode()).verify(f"{header}.{body}".encode(), _unb64(signature))


def test_an_archive_reads_back_whole(keys):
    issuer, subject = keys
    for compress in (True, False):
        archive = read_archive(_archive(keys, compress=compress))
        assert archive.compressed is compress
        assert archive.targets == ["x86_64-linux"] and archive.binaries["x86_64-linux"] == BINARY
        assert archive.claims.iss == issuer.public_key and archive.claims.sub == subject.public_key
        assert archive.wit_world is None


def test_a_wit_world_is_carried_and_hashed(keys):
    archive = read_archive(_archive(keys, wit_world=b"\0asm world"))
    assert archive.wit_world == b"\0asm world"
    assert archive.claims.wascap.target_hashes["world.wasm"] == hashlib.sha256(b"\0asm world").hexdigest().upper()


def test_a_changed_binary_is_refused(keys):
    files = _files(_archive(keys))
    files["x86_64-linux.bin"] += b"echo tampered\n"
    with pytest.raises(ArchiveError, match="x86_64-linux.bin does not match its hash"):
        read_archive(_tar(files))


def test_a_binary_the_claims_do_not_name_is_refused(keys):
    files = _files(_archive(keys))
    files["aarch64-linux.bin"] = BINARY
    with pytest.raises(ArchiveError, match="aarch64-linux.bin has no hash"):
        read_archive(_tar(files))


def test_a_changed_wit_world_is_refused(keys):
    files = _files(_archive(keys, wit_world=b"world"))
    files["world.wasm"] = b"another world"
    with pytest.raises(ArchiveError, match="world.wasm does not match"):
        read_archive(_tar(files))
    del files["world.wasm"]
    read_archive(_tar(files))  # the world is optional


def test_claims_signed_by_another_key_than_their_issuer_are_refused(keys):
    issuer, subject = keys
    files = _files(_archive(keys))
    claims = verify_claims(files["claims.jwt"].decode())
    impostor = SigningKey.generate(KeyKind.ACCOUNT)
    forged = encode_claims(claims, impostor)  # signed by the impostor, still naming the issuer
    files["claims.jwt"] = forged.encode()
    with pytest.raises(ArchiveError, match=f"does not verify with the issuer's public key {issuer.public_key}"):
        read_archive(_tar(files))
    header, body, signature = files["claims.jwt"].decode().split(".")
    edited = json.loads(_unb64(body))
    edited["wascap"]["target_hashes"]["x86_64-linux"] = "0" * 64
    new_body = base64.urlsafe_b64encode(json.dumps(edited).encode()).decode().rstrip("=")
    with pytest.raises(ArchiveError, match="does not verify"):
        verify_claims(f"{header}.{new_body}.{signature}")


def test_expired_and_future_claims_are_refused(keys):
    issuer, subject = keys
    claims = verify_claims(_files(_archive(keys))["claims.jwt"].decode())
    now = time.time()
    expired = ProviderClaims.model_validate({**claims.model_dump(), "exp": int(now) - 10})
    with pytest.raises(ArchiveError, match="expired"):
        verify_claims(encode_claims(expired, issuer), now)
    early = ProviderClaims.model_validate({**claims.model_dump(), "nbf": int(now) + 3600})
    with pytest.raises(ArchiveError, match="not valid yet"):
        verify_claims(encode_claims(early, issuer), now)


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "not a provider archive"),
    (b"\x1f\x8b garbage", "not a provider archive"),
    (_tar({"x86_64-linux.bin": BINARY}), "needs claims.jwt and at least one target binary"),
    (_tar({"claims.jwt": b"a.b.c"}), "needs claims.jwt and at least one target binary"),
    (_tar({"claims.jwt": b"not a jwt", "x86_64-linux.bin": BINARY}), "1 segments, expected 3"),
    (_tar({"claims.jwt": b"e30.e30.AA", "x86_64-linux.bin": BINARY}), "header is {}"),
])
def test_what_is_not_an_archive_is_refused_clearly(data, expected):
    with pytest.raises(ArchiveError, match=expected):
        read_archive(data)


def test_claims_without_provider_metadata_are_refused(keys):
    issuer, _ = keys
    header = base64.urlsafe_b64encode(b'{"typ":"jwt","alg":"Ed25519"}').decode().rstrip("=")
    body = base64.urlsafe_b64encode(json.dumps({"jti": "x", "iat": 1, "iss": issuer.public_key,
                                                "sub": issuer.public_key}).encode()).decode().rstrip("=")
    with pytest.raises(ArchiveError, match="wascap: Field required"):
        verify_claims(f"{header}.{body}.AA")


def test_bad_targets_and_key_kinds_are_refused(keys):
    issuer, subject = keys
    with pytest.raises(ArchiveError, match="not ARCH-OS"):
        build_archive({"linux": BINARY}, issuer, subject, name="n", vendor="v")
    with pytest.raises(ArchiveError, match="at least one target"):
        build_archive({}, issuer, subject, name="n", vendor="v")
    with pytest.raises(ArchiveError, match="issuer must be an account key"):
        build_archive({"x86_64-linux": BINARY}, subject, issuer, name="n", vendor="v")


# the launcher


def test_the_launcher_names_an_absolute_interpreter_quoted_for_sh():
    script = launcher(Path("/opt/my envs/bin/python")).decode()
    assert script.startswith("#!/bin/sh\n")
    assert "PYTHON='/opt/my envs/bin/python'\n" in script
    assert script.rstrip().endswith('exec "$PYTHON" -I -m concordance_provider.cli provider')


def test_an_interpreter_without_the_package_is_refused(tmp_path):
    with pytest.raises(ArchiveError, match="absolute path"):
        check_interpreter(Path("python3"))
    with pytest.raises(ArchiveError, match="cannot be run"):
        check_interpreter(tmp_path / "no-python")
    bare = tmp_path / "bare-python"
    bare.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named concordance_provider' >&2\nexit 1\n")
    bare.chmod(0o755)
    with pytest.raises(ArchiveError, match="cannot import concordance_provider"):
        check_interpreter(bare)


# the OCI reference and manifest


def test_references_need_a_registry_and_a_version_tag():
    assert Reference.parse("127.0.0.1:5001/Concordance:0.1.0") == Reference("127.0.0.1:5001", "concordance", "0.1.0")
    assert str(Reference.parse("ghcr.io/org/concordance:1.2")) == "ghcr.io/org/concordance:1.2"
    for text, expected in (("concordance:0.1.0", "does not name a registry"), ("127.0.0.1:5001/concordance", "no tag"),
                           ("127.0.0.1:5001/concordance:latest", "'latest' is refused"),
                           ("127.0.0.1:5001/con cordance:1", "not a valid OCI reference")):
        with pytest.raises(ValueError, match=expected):
            Reference.parse(text)


def test_the_manifest_has_washs_media_types_and_the_archive_as_its_one_layer(keys):
    data = _archive(keys)
    manifest = json.loads(par_manifest(data))
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"] == {"mediaType": PAR_CONFIG_MEDIA_TYPE, "size": 2,
                                  "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest()}
    assert manifest["layers"] == [{"mediaType": PAR_LAYER_MEDIA_TYPE, "size": len(data),
                                   "digest": "sha256:" + hashlib.sha256(data).hexdigest()}]
    assert PAR_CONFIG_MEDIA_TYPE == "application/vnd.wasmcloud.provider.archive.config"
    assert PAR_LAYER_MEDIA_TYPE == "application/vnd.wasmcloud.provider.archive.layer.v1+par"
