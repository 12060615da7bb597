"""Who may publish and subscribe to what on NATS: each party's permissions as data, and the
nats-server configuration that grants them.

The sets were found by tracing the daemon and the client commands (``nats-server -DV``) through the
bank example, the wire transfer included. Four parties: the daemon; a client (sends commands,
reads outcomes, state, events and read models); an operator (rebuild, replay, dead letters); a
read-only auditor. Nobody but the operator may purge anything, and only dead letters and read
models (which replay empties); nobody may delete a stream or use ``$JS.API.>`` as a whole.

Clients and the auditor read with direct gets and wait for outcomes on the bucket's subjects; they
create no consumers: whoever may create an ephemeral consumer on a stream may also rewrite a
durable one by giving its name.
NATS wildcards match whole tokens, so each read-model bucket is named.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr

from .deployed import DEPLOYED_BUCKET
from .links import Interest, Role
from .naming import (
    COMMAND_PREFIX,
    COMMANDS_STREAM,
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
    EVENT_PREFIX,
    EVENTS_STREAM,
    RESULTS_BUCKET,
    STATE_BUCKET,
    check_token,
)
from .status import STATUS_SUBJECT
from .workers.stateless import read_model_bucket

DAEMON_INBOX = "_INBOX"  # nats-py's default; only the daemon's user may subscribe to it
ACCOUNT = "CONCORDANCE"


class Permissions(BaseModel):
    """One user's publish and subscribe allow lists; ``allow_responses`` lets it answer requests."""

    model_config = ConfigDict(frozen=True)
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False

    def allows(self, action: str, subject: str) -> str | None:
        """The pattern that lets ``action`` ("publish" or "subscribe") use ``subject``, or None.
        Case is ignored, since nats-py reports a refused subject in lower case."""
        patterns = self.publish if action == "publish" else self.subscribe
        return next((p for p in patterns if subject_matches(p.lower(), subject.lower())), None)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS matching: ``*`` is one token, ``>`` one or more at the end; a pattern given as the
    subject (as a subscription is) matches only a pattern it covers."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(want) == len(have)


class Durable(BaseModel):
    model_config = ConfigDict(frozen=True)
    stream: str
    name: str


class Application(BaseModel):
    """What the permissions name, taken from the components an application links."""

    model_config = ConfigDict(frozen=True)
    aggregates: tuple[str, ...] = ()
    durables: tuple[Durable, ...] = ()
    buckets: tuple[str, ...] = ()  # read-model buckets
    handler_durables: tuple[Durable, ...] = ()  # projectors' and notifiers': replay resets them

    @classmethod
    def of(cls, interests: Iterable[Interest]) -> "Application":
        aggregates, durables, buckets, handlers = [], [], [], []
        for interest in interests:
            if interest.role is Role.AGGREGATE:
                aggregates.append(interest.name)
                durables.append(Durable(stream=COMMANDS_STREAM, name=f"AGG_CMD_{interest.name}"))
            durables.append(Durable(stream=EVENTS_STREAM, name=interest.consumer_name))
            if interest.role in (Role.PROJECTOR, Role.NOTIFIER):
                buckets.append(read_model_bucket(interest))
                handlers.append(Durable(stream=EVENTS_STREAM, name=interest.consumer_name))
        return cls(aggregates=tuple(dict.fromkeys(aggregates)), durables=tuple(durables),
                   buckets=tuple(dict.fromkeys(buckets)), handler_durables=tuple(handlers))

    @property
    def kv_streams(self) -> tuple[str, ...]:
        return (f"KV_{STATE_BUCKET}", f"KV_{RESULTS_BUCKET}", *(f"KV_{b}" for b in self.buckets))

    @property
    def streams(self) -> tuple[str, ...]:
        return (COMMANDS_STREAM, EVENTS_STREAM, DEADLETTER_STREAM, *self.kv_streams)


class Lattice(BaseModel):
    """The provider subjects a daemon started with ``--lattice`` serves."""

    model_config = ConfigDict(frozen=True)
    name: str
    provider_id: str = "concordance"


COMMAND_SUBJECTS = (f"{COMMAND_PREFIX}.*", f"{COMMAND_PREFIX}.*.*")  # cc.commands.{aggregate}[.{key}]
STATUS_SUBJECTS = (STATUS_SUBJECT, f"{STATUS_SUBJECT}.*")
RESULTS_WATCH = f"$KV.{RESULTS_BUCKET}.>"  # waiting for an outcome: the daemon's put, as it is stored


def _direct_get(streams: Iterable[str]) -> list[str]:
    # the request names the stream only, or the stream and the subject to read (nats-py's KV get)
    return [s for stream in streams for s in (f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>")]


def _stream_info(streams: Iterable[str]) -> list[str]:
    return [f"$JS.API.STREAM.INFO.{stream}" for stream in streams]


def _durable_setup(durable: Durable) -> list[str]:
    """Create (either request form, the newer one with its filter subject) and look up a durable."""
    stream, name = durable.stream, durable.name
    return [f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}", f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{name}.>", f"$JS.API.CONSUMER.INFO.{stream}.{name}"]


def _durable(durable: Durable) -> list[str]:
    """Set up a durable consumer, fetch from it and acknowledge what it delivers."""
    stream, name = durable.stream, durable.name
    return [*_durable_setup(durable), f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", f"$JS.ACK.{stream}.{name}.>"]


def daemon(app: Application, lattice: Lattice | None = None) -> Permissions:
    """The daemon: its streams and buckets (created if missing, updated to its settings), its own
    durable consumers, every command and event subject, state, outcomes and read models."""
    publish = [
        "$JS.API.INFO",  # the health probe
        *_stream_info(app.streams),
        *(f"$JS.API.STREAM.CREATE.{s}" for s in app.streams),
        *(f"$JS.API.STREAM.UPDATE.{s}" for s in app.streams),
        *_direct_get(app.streams),
        f"$JS.API.STREAM.MSG.DELETE.{COMMANDS_STREAM}",  # commands for an aggregate nobody links
        f"$JS.API.CONSUMER.INFO.{COMMANDS_STREAM}.*",  # ... found by asking for its consumer
        *(s for durable in app.durables for s in _durable(durable)),
        *COMMAND_SUBJECTS,  # process managers' commands
        f"{EVENT_PREFIX}.>",  # aggregates' and notifiers' events
        f"{DEADLETTER_PREFIX}.>",
        *(f"$KV.{bucket}.>" for bucket in (STATE_BUCKET, RESULTS_BUCKET, *app.buckets)),
    ]
    subscribe = [f"{DAEMON_INBOX}.>", *COMMAND_SUBJECTS, *STATUS_SUBJECTS]
    if lattice is not None:
        publish.append(f"cc.dispatch.{lattice.name}.>")  # components on wasmCloud hosts
        subscribe.append(f"wasmbus.rpc.{lattice.name}.{lattice.provider_id}.>")
    # status reports and provider answers go to whoever asked, on their inbox
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe), allow_responses=True)


def client(app: Application, inbox_prefix: str) -> Permissions:
    """A client: sends commands to the application's aggregates (with or without the key in the
    subject) and waits for their outcomes; reads state, events and read models. Writes nothing else."""
    readable = (COMMANDS_STREAM, EVENTS_STREAM, *app.kv_streams)
    publish = [
        *(s for aggregate in app.aggregates for s in (f"{COMMAND_PREFIX}.{aggregate}", f"{COMMAND_PREFIX}.{aggregate}.*")),
        *_stream_info(readable),
        *_direct_get((EVENTS_STREAM, *app.kv_streams)),
    ]
    return Permissions(publish=tuple(publish), subscribe=(f"{inbox_prefix}.>", RESULTS_WATCH))


def keyed_client(instances: Iterable[tuple[str, str]], inbox_prefix: str) -> Permissions:
    """A client held to some aggregate instances (aggregate, key): it sends their commands, with the
    key in the subject, and waits for and reads their outcomes (what `concordance send` does)."""
    publish, subscribe = [], [f"{inbox_prefix}.>"]
    for aggregate, key in instances:
        outcomes = f"$KV.{RESULTS_BUCKET}.{aggregate}.{key}.>"
        publish += [f"{COMMAND_PREFIX}.{aggregate}.{key}", f"$JS.API.DIRECT.GET.KV_{RESULTS_BUCKET}.{outcomes}"]
        subscribe.append(outcomes)
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def auditor(app: Application, inbox_prefix: str) -> Permissions:
    """Reads everything that is stored and asks the daemons for their status; changes nothing."""
    streams = (*app.streams, f"KV_{DEPLOYED_BUCKET}")  # what `deploy` placed on hosts, shown by status
    publish = [*_stream_info(streams), *_direct_get(streams), *STATUS_SUBJECTS]
    return Permissions(publish=tuple(publish), subscribe=(f"{inbox_prefix}.>", RESULTS_WATCH))


def operator(app: Application, inbox_prefix: str) -> Permissions:
    """The auditor's reads, and the maintenance commands: ``rebuild`` (writes state), ``replay``
    (resets a projector's or notifier's consumer and read model), ``deadletters retry`` (sends a
    dead command or event again) and ``deadletters purge``."""
    reads = auditor(app, inbox_prefix)
    handler_consumers = [s for d in app.handler_durables
                         for s in (*_durable_setup(d), f"$JS.API.CONSUMER.DELETE.{d.stream}.{d.name}")]
    publish = [
        *reads.publish,
        f"$KV.{STATE_BUCKET}.>",  # rebuild
        *handler_consumers,  # replay
        *(f"$KV.{bucket}.>" for bucket in app.buckets),
        *(f"$JS.API.STREAM.PURGE.KV_{bucket}" for bucket in app.buckets),
        *COMMAND_SUBJECTS,  # a dead command sent again
        f"{EVENT_PREFIX}.*.*.*.retry",  # a dead event sent again, to the one handler that failed it
        f"$JS.API.STREAM.MSG.DELETE.{DEADLETTER_STREAM}",
        f"$JS.API.STREAM.PURGE.{DEADLETTER_STREAM}",
    ]
    return Permissions(publish=tuple(publish), subscribe=reads.subscribe)


_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "?([^"\s]+)', re.IGNORECASE)


def refusal(error: str, needed: Permissions, who: str = "the daemon's NATS user") -> str | None:
    """If ``error`` is NATS refusing a permission, a sentence naming what is missing, else None.

    nats-py reports the refused subject in lower case; the permission set restores its case."""
    found = _VIOLATION.search(error)
    if found is None:
        return None
    action = "publish" if found.group(1).lower() == "publish" else "subscribe"
    subject = found.group(2)
    pattern = needed.allows(action, subject)
    if pattern is not None and pattern.lower() == subject.lower():
        return f"{who} may not {action} to {pattern}: grant it (`concordance nats-config` writes what each user needs)"
    named = f"{who} may not {action} to {subject} (in lower case, as NATS reports it)"
    if pattern is not None:
        return f"{named}: grant {action} on {pattern} (`concordance nats-config` writes what each user needs)"
    return f"{named}: grant it"


class User(BaseModel):
    name: str
    password: SecretStr
    permissions: Permissions


def inbox_prefix_of(user: str) -> str:
    """Each user's own inboxes: ``_INBOX_{user}``, a token ``_INBOX.>`` does not match."""
    return f"{DAEMON_INBOX}_{check_token(user, 'user name')}"


def permissions_of(role: str, app: Application, inbox_prefix: str, lattice: Lattice | None = None) -> Permissions:
    if role == "daemon":
        return daemon(app, lattice)
    return {"client": client, "operator": operator, "auditor": auditor}[role](app, inbox_prefix)


def _quoted(value: str) -> str:
    return json.dumps(value)  # a double-quoted string, as nats-server reads it (no $VARIABLE inside)


def _user_block(user: User) -> str:
    perms = user.permissions
    lines = [f"      {{ user: {_quoted(user.name)}, password: {_quoted(user.password.get_secret_value())}",
             "        permissions: {",
             "          publish: { allow: [", *(f"            {_quoted(s)}," for s in perms.publish), "          ] }",
             "          subscribe: { allow: [", *(f"            {_quoted(s)}," for s in perms.subscribe), "          ] }"]
    if perms.allow_responses:
        lines.append("          allow_responses: true")
    lines += ["        }", "      }"]
    return "\n".join(lines)


def server_config(users: list[User], *, listen: str, store_dir: Path, source: str) -> str:
    """A nats-server configuration: JetStream on, one account with JetStream for every user."""
    body = "\n".join(_user_block(u) for u in users)
    return (f"# nats-server configuration written by `concordance nats-config` from {source}.\n"
            f"# It holds passwords: keep it readable by the server's user only.\n"
            f"listen: {_quoted(listen)}\n"
            f"jetstream {{ store_dir: {_quoted(str(store_dir))} }}\n"
            f"accounts {{\n  {ACCOUNT} {{\n    jetstream: enabled\n    users: [\n{body}\n    ]\n  }}\n}}\n")


def new_password() -> str:
    return secrets.token_urlsafe(32)
