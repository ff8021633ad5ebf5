"""The soak driver (reliability issue 14); scripts/soak.sh starts the services and runs it.

For --seconds it makes chats at a steady modest rate (SOAK_RATE chats/s, open loop, over
SOAK_USERS users identified by x-forwarded-email) and votes on most answers: thumbs up/down,
some changed, some retracted, some with a comment, some with a numeric `rating` as well. It
records every request's outcome and, per (message, user, name), the state the last ACCEPTED
(200) request left. A vote request that fails (503 while Postgres restarts, a transport error)
leaves its key unsettled: the same action is sent again until it is accepted, so the final
state of every key is known exactly. Meanwhile it flaps MLflow (stop, stay down, start and wait
until it answers) and restarts Postgres (pg_ctl stop -m fast, start), through `soak.sh ctl`, and
samples the proxy's RSS and open file descriptors.

After the load: it waits (bounded) until the proxy's outbox has nothing pending or waiting,
then reads every voted trace from MLflow and counts, per key, lost (expected, missing),
duplicated (more than one assessment by that user under that name), wrong (other value or
rationale) and retracted-but-present assessments. It writes report.txt / report.json /
samples.jsonl to --out and exits 1 when any of those is non-zero, something was not delivered,
or a vote could not be settled.

Everything it talks to is on 127.0.0.1; every loop is bounded by the run's deadlines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx

NAME = "user_feedback"
RATING = "rating"
NO_OP_TRACE = "MLFLOW_NO_OP_SPAN_TRACE_ID"
# A key absent in MLflow (never voted or retracted).
ABSENT = None


def env_num(name: str, default: float, kind=float):
    raw = os.environ.get(name, "")
    if not raw:
        return kind(default)
    try:
        return kind(raw)
    except ValueError:
        sys.exit(f"soak: {name}={raw!r} is not a number")


def log(msg: str) -> None:
    print(f"    [soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Message:
    message_id: str
    chat_id: str
    user: str
    trace_id: str | None  # from the stream (the proxy's trace event or the agent's own)


@dataclass
class Key:
    message: Message
    name: str
    # (value, comment) the last accepted request left, or ABSENT; None until one is accepted.
    expected: tuple[Any, str | None] | None = ABSENT
    accepted: int = 0
    settled: bool = True
    trace_from_proxy: str | None = None


@dataclass
class Outcomes:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(env_num("SOAK_SEED", 14, int))
        # What one single-worker `mlflow server` on SQLite ingests, with room to catch up after
        # a flap, on a busy 2-core machine: about 3.5 traces/s at best there.
        self.rate = env_num("SOAK_RATE", 2.0)
        self.users = [f"soak-user-{i}@example.com" for i in range(env_num("SOAK_USERS", 8, int))]
        self.seconds = args.seconds
        self.drain_limit = env_num("SOAK_DRAIN_SECONDS", 300.0)
        self.sample_every = env_num("SOAK_SAMPLE_SECONDS", 2.0)
        short = self.seconds < 300
        # One flap per 5 minutes: an outage (20-40 s down plus its restart) and the catch-up after
        # it must fit before the next one, or the backlog only grows.
        self.flaps = env_num("SOAK_FLAPS", max(1, round(self.seconds / 300)), int)
        self.pg_restarts = env_num("SOAK_PG_RESTARTS", 1 if short else 2, int)
        # MLflow's time down per flap (before the start command; its start-up adds to it).
        self.flap_down = (5.0, 5.0) if short else (20.0, 40.0)
        self.t0 = 0.0
        self.load_end = 0.0
        self.chats = Outcomes()
        self.votes = Outcomes()
        self.mlflow_status = Outcomes()
        self.chat_seconds: list[float] = []
        self.keys: dict[tuple[str, str, str], Key] = {}
        self.messages = 0
        self.in_flight = 0
        self.max_in_flight = 64
        self.tasks: set[asyncio.Task] = set()
        self.events: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.unexpected: list[str] = []
        self.current_chat: dict[str, tuple[str, int]] = {}
        self.drain_curve: list[dict[str, Any]] = []
        self.client: httpx.AsyncClient | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------ chats

    def chat_for(self, user: str) -> str:
        chat, left = self.current_chat.get(user, ("", 0))
        if left <= 0:
            chat = f"soak-chat-{self.rng.getrandbits(48):012x}"
            left = self.rng.randint(1, 6)
        self.current_chat[user] = (chat, left - 1)
        return chat

    async def chat(self, user: str) -> None:
        self.in_flight += 1
        try:
            msg = await self.chat_once(user)
        finally:
            self.in_flight -= 1
        if msg is not None:
            self.spawn(self.vote_on(msg))

    async def chat_once(self, user: str) -> Message | None:
        assert self.client is not None
        self.messages += 1
        chat_id = self.chat_for(user)
        body = {
            "input": [{"role": "user", "content": f"soak message {self.messages} from {user}"}],
            "stream": True,
            "chatId": chat_id,
        }
        headers = {
            "x-forwarded-email": user,
            "x-chat-id": chat_id,
            "accept": "text/event-stream",
        }
        started = time.monotonic()
        trace_id = None
        done = error = False
        try:
            async with self.client.stream(
                "POST", self.args.proxy + "/api/chat", json=body, headers=headers, timeout=120
            ) as r:
                message_id = r.headers.get("x-message-id")
                if r.status_code != 200:
                    await r.aread()
                    self.chats.add(f"http {r.status_code}")
                    return None
                event, data = "", []
                async for line in r.aiter_lines():
                    if line == "":
                        payload = "\n".join(data)
                        if event == "feedback-proxy.trace":
                            trace_id = json.loads(payload).get("traceId") or trace_id
                        elif payload == "[DONE]":
                            done = True
                        elif payload.startswith("{"):
                            obj = json.loads(payload)
                            if isinstance(obj.get("trace_id"), str) and obj["trace_id"] != NO_OP_TRACE:
                                trace_id = trace_id or obj["trace_id"]
                            if "error" in obj and "type" not in obj:
                                error = True
                        event, data = "", []
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            self.chats.add(f"failed: {type(e).__name__}")
            return None
        self.chat_seconds.append(time.monotonic() - started)
        if not message_id:
            self.chats.add("no x-message-id")
            self.unexpected.append(f"chat in {chat_id}: 200 without x-message-id")
            return None
        if error or not done:
            self.chats.add("stream error" if error else "stream cut short")
            return None
        self.chats.add("ok" if trace_id else "ok, no trace id in the stream")
        return Message(message_id, chat_id, user, trace_id)

    async def load(self) -> None:
        """Open loop: a chat every 1/rate seconds (jittered), whatever the previous ones do."""
        interval = 1.0 / self.rate
        next_at = 0.0
        while True:
            next_at += interval * self.rng.uniform(0.5, 1.5)
            if next_at >= self.seconds:
                break
            # A pacing sleep, not a synchronisation: the load is a schedule.
            await asyncio.sleep(max(0.0, next_at - self.now()))
            if self.now() - next_at > 5:
                next_at = self.now()  # after a stall of the driver itself: no burst
            if self.in_flight >= self.max_in_flight:
                self.chats.add("skipped: too many in flight")
                continue
            self.spawn(self.chat(self.rng.choice(self.users)))

    # ------------------------------------------------------------ votes

    def key(self, msg: Message, name: str) -> Key:
        k = (msg.message_id, msg.user, name)
        if k not in self.keys:
            self.keys[k] = Key(msg, name)
        return self.keys[k]

    async def vote_on(self, msg: Message) -> None:
        rng = self.rng
        if rng.random() < 0.15:
            return
        scripts = [self.thumbs_script(msg)]
        if rng.random() < 0.2:
            scripts.append(self.rating_script(msg))
        await asyncio.gather(*scripts)

    def comment(self) -> str | None:
        r = self.rng.random()
        if r < 0.2:
            return f"soak comment {self.rng.getrandbits(32):08x}"
        return None

    async def pause(self, lo: float, hi: float) -> None:
        # Think time (pacing); halved in short runs so that the last votes settle soon after
        # the load ends.
        scale = 0.5 if self.seconds < 300 else 1.0
        await asyncio.sleep(self.rng.uniform(lo, hi) * scale)

    async def thumbs_script(self, msg: Message) -> None:
        key = self.key(msg, NAME)
        up = self.rng.random() < 0.7
        await self.pause(0.0, 1.5)
        if not await self.perform(key, ("post", up, self.comment())):
            return
        if self.rng.random() < 0.3:
            await self.pause(0.5, 8.0)
            if not await self.perform(key, ("post", not up, self.comment())):
                return
        if self.rng.random() < 0.15:
            await self.pause(0.5, 8.0)
            await self.perform(key, ("retract",))

    async def rating_script(self, msg: Message) -> None:
        key = self.key(msg, RATING)
        await self.pause(0.0, 3.0)
        if not await self.perform(key, ("post", self.rng.randint(1, 5), None)):
            return
        if self.rng.random() < 0.3:
            await self.pause(0.5, 8.0)
            await self.perform(key, ("post", self.rng.randint(1, 5), None))

    async def perform(self, key: Key, action: tuple) -> bool:
        """Sends `action` until it is accepted (bounded by the settle deadline); whether it
        was. A script stops at an action that was not: what follows would build on it."""
        assert self.client is not None
        msg = key.message
        headers = {"x-forwarded-email": msg.user, "content-type": "application/json"}
        deadline = self.seconds + 120
        wait = 0.5
        uncertain = False
        while True:
            try:
                if action[0] == "post":
                    body: dict[str, Any] = {"chatId": msg.chat_id, "messageId": msg.message_id}
                    if key.name == NAME:
                        body["isUpvoted"] = action[1]
                    else:
                        body["name"] = key.name
                        body["value"] = action[1]
                    if action[2] is not None:
                        body["comment"] = action[2]
                    r = await self.client.post(
                        self.args.proxy + "/api/feedback", json=body, headers=headers, timeout=60
                    )
                else:
                    path = "/api/feedback/{}/{}".format(
                        urllib.parse.quote(msg.chat_id, safe=""),
                        urllib.parse.quote(msg.message_id, safe=""),
                    )
                    if key.name != NAME:
                        path += "?name=" + urllib.parse.quote(key.name)
                    r = await self.client.delete(self.args.proxy + path, headers=headers, timeout=60)
                status = r.status_code
            except httpx.HTTPError as e:
                status = None
                self.votes.add(f"{action[0]}: failed: {type(e).__name__}")
            if status is not None:
                self.votes.add(f"{action[0]}: http {status}")
            if status == 200:
                body = r.json()
                self.mlflow_status.add(str(body.get("mlflowStatus")))
                if isinstance(body.get("traceId"), str):
                    key.trace_from_proxy = body["traceId"]
                key.expected = ABSENT if action[0] == "retract" else (action[1], action[2])
                key.accepted += 1
                key.settled = True
                return True
            if status == 404 and action[0] == "retract" and uncertain:
                # An earlier attempt's outcome was unknown and it did retract the vote.
                key.expected = ABSENT
                key.settled = True
                return True
            if status is not None and 400 <= status < 500 and status != 429:
                # Nothing was stored, and sending it again cannot change that.
                self.unexpected.append(
                    f"{action[0]} on {msg.message_id} ({key.name}) by {msg.user}: {status} {r.text[:200]}"
                )
                key.settled = key.settled and not uncertain
                return False
            uncertain = True
            key.settled = False
            if self.now() > deadline:
                return False
            retry_after = r.headers.get("retry-after") if status == 429 else None
            await asyncio.sleep(float(retry_after) if retry_after and retry_after.isdigit() else wait)
            wait = min(wait * 2, 5.0)

    # ------------------------------------------------------------ disturbances

    async def ctl(self, action: str) -> tuple[bool, float]:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "bash", self.args.ctl, "ctl", action,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        ok = proc.returncode == 0
        if not ok:
            log(f"ctl {action} failed: {err.decode(errors='replace')[-2000:]}")
        return ok, time.monotonic() - started

    def plan(self, kind: str) -> list[float]:
        """When each disturbance of `kind` begins. MLflow flaps come first in their slot (its
        restart takes 10-40 s on a busy machine, and the backlog of traces and votes should
        drain while the load still runs); Postgres restarts late in theirs. Two independent
        schedules: a restart is not postponed by a flap in progress."""
        if kind == "mlflow":
            n, phase = self.flaps, 0.05
        else:
            n, phase = self.pg_restarts, 0.7
        return [self.seconds * 0.85 * (i + phase) / n for i in range(n)]

    async def disturb(self, kind: str) -> None:
        for at in self.plan(kind):
            await asyncio.sleep(max(0.0, at - self.now()))  # the schedule (pacing)
            began = self.now()
            if kind == "mlflow":
                ok, _ = await self.ctl("mlflow-stop")
                down = self.rng.uniform(*self.flap_down)
                log(f"MLflow stopped at {began:.0f} s; down for {down:.0f} s")
                await asyncio.sleep(down)  # the outage itself
                ok2, start_s = await self.ctl("mlflow-start")
                ev = {"kind": "mlflow flap", "at": round(began, 1), "down_s": round(down, 1),
                      "start_s": round(start_s, 1), "outage_s": round(self.now() - began, 1),
                      "ok": ok and ok2}
                log(f"MLflow answering again after {ev['outage_s']} s")
            else:
                ok, took = await self.ctl("pg-restart")
                ev = {"kind": "postgres restart", "at": round(began, 1), "took_s": round(took, 1), "ok": ok}
                log(f"Postgres restarted at {began:.0f} s in {took:.1f} s")
            self.events.append(ev)
            if not ev["ok"]:
                self.failures.append(f"{ev['kind']} at {ev['at']} s failed (see the logs)")
                return

    # ------------------------------------------------------------ samples

    def sample(self) -> dict[str, Any] | None:
        pid = self.args.proxy_pid
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration, ValueError):
            return None
        return {"t": round(self.now(), 2), "rss_kib": rss, "fds": fds, "in_flight": self.in_flight}

    async def sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            s = self.sample()
            if s is None:
                self.failures.append(f"the proxy (pid {self.args.proxy_pid}) is gone at {self.now():.0f} s")
                return
            self.samples.append(s)
            try:
                await asyncio.wait_for(stop.wait(), self.sample_every)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------ drain and check

    async def stats(self) -> dict[str, Any] | None:
        async def run(*args: str) -> tuple[int, str]:
            p = await asyncio.create_subprocess_exec(
                self.args.bin, "deliveries", *args, "--config", self.args.config,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, _ = await p.communicate()
            return p.returncode or 0, out.decode(errors="replace")

        code, out = await run("stats", "--json")
        if code == 0:
            try:
                return json.loads(out)
            except json.JSONDecodeError:
                return None
        # An older binary without `deliveries stats`: the summary line of `deliveries list`.
        code, out = await run("list", "--limit", "1")
        m = re.search(r"(\d+) pending, (\d+) waiting, (\d+) done, (\d+) dead", out)
        if code != 0 or not m:
            return None
        return dict(zip(("pending", "waiting", "done", "dead"), map(int, m.groups())))

    async def drain(self) -> tuple[dict[str, Any] | None, float]:
        started = time.monotonic()
        next_note = started + 15
        last = None
        while True:
            s = await self.stats()
            if s is not None:
                last = s
                self.drain_curve.append({"t": round(time.monotonic() - started, 1),
                                         **{k: s.get(k) for k in ("pending", "waiting", "dead")}})
                if s["pending"] == 0 and s["waiting"] == 0:
                    break
            if time.monotonic() - started > self.drain_limit:
                break
            if s is not None and time.monotonic() >= next_note:
                log(f"outbox: {s['pending']} pending, {s['waiting']} waiting, {s['dead']} dead")
                next_note += 15
            await asyncio.sleep(2)  # polling interval of the wait on the outbox
        return last, time.monotonic() - started

    async def dump_outbox(self) -> None:
        for state in ("pending", "waiting", "dead"):
            p = await asyncio.create_subprocess_exec(
                self.args.bin, "deliveries", "list", "--config", self.args.config,
                "--state", state, "--limit", "1000", "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await p.communicate()
            with open(os.path.join(self.args.out, f"outbox-{state}.json"), "wb") as f:
                f.write(out)

    async def check(self) -> dict[str, Any]:
        assert self.client is not None
        by_trace: dict[str, list[Key]] = {}
        counts = {"keys": 0, "checked": 0, "lost": 0, "duplicated": 0, "wrong": 0,
                  "retracted_but_present": 0, "unexpected_assessments": 0, "unsettled": 0,
                  "no_trace_id": 0, "trace_id_from_proxy_only": 0, "trace_id_mismatch": 0,
                  "trace_missing_in_mlflow": 0}
        details: list[str] = []
        for key in self.keys.values():
            if key.accepted == 0 and key.settled:
                continue  # never accepted, nothing pending: nothing to expect
            counts["keys"] += 1
            if not key.settled:
                counts["unsettled"] += 1
                details.append(f"unsettled: {key.message.message_id} {key.name} {key.message.user}")
                continue
            trace = key.message.trace_id
            if trace is None:
                if key.trace_from_proxy is None:
                    counts["no_trace_id"] += 1
                    continue
                counts["trace_id_from_proxy_only"] += 1
                trace = key.trace_from_proxy
            elif key.trace_from_proxy is not None and key.trace_from_proxy != trace:
                counts["trace_id_mismatch"] += 1
                details.append(f"trace mismatch: {key.message.message_id}: stream {trace}, proxy {key.trace_from_proxy}")
            by_trace.setdefault(trace, []).append(key)

        sem = asyncio.Semaphore(8)
        ours = set(self.users)

        async def one(trace: str, keys: list[Key]) -> None:
            url = self.args.mlflow + "/api/3.0/mlflow/traces/" + urllib.parse.quote(trace, safe="")
            async with sem:
                for attempt in range(5):
                    try:
                        r = await self.client.get(url, timeout=30)
                        break
                    except httpx.HTTPError:
                        await asyncio.sleep(1 + attempt)
                else:
                    counts["trace_missing_in_mlflow"] += len(keys)
                    details.append(f"trace {trace}: MLflow unreachable")
                    return
            if r.status_code == 404:
                # The agent never got the trace to MLflow: its votes cannot have been delivered.
                counts["trace_missing_in_mlflow"] += len(keys)
                counts["checked"] += len(keys)
                for k in keys:
                    if k.expected is not ABSENT:
                        counts["lost"] += 1
                details.append(f"trace {trace}: not in MLflow")
                return
            if r.status_code != 200:
                counts["trace_missing_in_mlflow"] += len(keys)
                details.append(f"trace {trace}: MLflow answered {r.status_code}")
                return
            info = r.json().get("trace", {}).get("trace_info", {})
            found: dict[tuple[str, str], list[dict]] = {}
            for a in info.get("assessments", []) or []:
                src = (a.get("source") or {}).get("source_id")
                if src in ours:
                    found.setdefault((src, a.get("assessment_name")), []).append(a)
            expected_here = {(k.message.user, k.name): k for k in keys}
            for (user, name), got in found.items():
                if (user, name) not in expected_here:
                    counts["unexpected_assessments"] += len(got)
                    details.append(f"trace {trace}: unexpected {name} by {user}")
            for (user, name), k in expected_here.items():
                counts["checked"] += 1
                got = found.get((user, name), [])
                if k.expected is ABSENT:
                    if got:
                        counts["retracted_but_present"] += 1
                        details.append(f"trace {trace}: {name} by {user} retracted but present")
                    continue
                if not got:
                    counts["lost"] += 1
                    details.append(f"trace {trace}: {name} by {user} lost (expected {k.expected})")
                    continue
                if len(got) > 1:
                    counts["duplicated"] += 1
                    details.append(f"trace {trace}: {len(got)} {name} assessments by {user}")
                value, comment = k.expected
                a = got[0]
                actual = (a.get("feedback") or {}).get("value")
                same = (actual is value) if isinstance(value, bool) else (
                    isinstance(actual, (int, float)) and not isinstance(actual, bool)
                    and float(actual) == float(value))
                if not same or (a.get("rationale") or None) != comment or a.get("valid") is False:
                    counts["wrong"] += 1
                    details.append(
                        f"trace {trace}: {name} by {user} is {actual!r}/{a.get('rationale')!r}"
                        f" (valid {a.get('valid')}), expected {value!r}/{comment!r}")

        await asyncio.gather(*(one(t, ks) for t, ks in by_trace.items()))
        counts["traces"] = len(by_trace)
        return {"counts": counts, "details": details[:200]}

    async def tamper(self) -> dict[str, int]:
        """SOAK_SELF_TEST=1: the check must see what is done to MLflow behind the proxy's back.

        Deletes one expected assessment (lost), adds a second one for another key
        (duplicated), changes a third one's value (wrong) and re-creates a retracted one
        (retracted but present); returns what the check must then count."""
        assert self.client is not None
        base = self.args.mlflow + "/api/3.0/mlflow/traces/"
        present = [k for k in self.keys.values() if k.settled and k.message.trace_id
                   and k.name == NAME and k.expected is not ABSENT and k.expected[1] is None]
        retracted = [k for k in self.keys.values() if k.settled and k.message.trace_id
                     and k.accepted and k.expected is ABSENT]
        injected = {"lost": 0, "duplicated": 0, "wrong": 0, "retracted_but_present": 0}
        if len(present) < 3 or not retracted:
            self.failures.append("self-test: too few votes to tamper with")
            return injected

        async def find(k: Key) -> tuple[str, dict] | None:
            trace = k.message.trace_id or ""
            r = await self.client.get(base + urllib.parse.quote(trace, safe=""), timeout=30)
            for a in r.json()["trace"]["trace_info"].get("assessments", []):
                if a.get("assessment_name") == k.name and (a.get("source") or {}).get("source_id") == k.message.user:
                    return trace, a
            return None

        def new(k: Key, value: Any) -> dict:
            return {"assessment": {
                "trace_id": k.message.trace_id, "assessment_name": k.name,
                "source": {"source_type": "HUMAN", "source_id": k.message.user},
                "feedback": {"value": value}}}

        lost, dup, wrong = present[:3]
        if hit := await find(lost):
            r = await self.client.delete(f"{base}{urllib.parse.quote(hit[0], safe='')}/assessments/{hit[1]['assessment_id']}")
            injected["lost"] += r.status_code == 200
        r = await self.client.post(f"{base}{urllib.parse.quote(dup.message.trace_id or '', safe='')}/assessments",
                                   json=new(dup, dup.expected[0]))
        injected["duplicated"] += r.status_code == 200
        if hit := await find(wrong):
            r = await self.client.patch(
                f"{base}{urllib.parse.quote(hit[0], safe='')}/assessments/{hit[1]['assessment_id']}",
                json={"assessment": {"feedback": {"value": not wrong.expected[0]}}, "update_mask": "feedback"})
            injected["wrong"] += r.status_code == 200
        k = retracted[0]
        r = await self.client.post(f"{base}{urllib.parse.quote(k.message.trace_id or '', safe='')}/assessments",
                                   json=new(k, True))
        injected["retracted_but_present"] += r.status_code == 200
        log(f"self-test: injected {injected}")
        return injected

    def judge_self_test(self, injected: dict[str, int], counts: dict[str, int]) -> None:
        seen = {k: counts[k] for k in injected}
        if seen == injected and all(v == 1 for v in injected.values()):
            log(f"self-test passed: the check counted exactly what was injected ({seen})")
            # The injected findings are the expected outcome of a self-test, not failures.
            for k in injected:
                counts[k] = 0
            counts["self_test_detected"] = sum(seen.values())
        else:
            self.failures.append(f"self-test: injected {injected}, the check counted {seen}")

    async def metrics(self) -> dict[str, float]:
        assert self.client is not None
        try:
            r = await self.client.get(self.args.proxy + "/metrics", timeout=10)
        except httpx.HTTPError:
            return {}
        out: dict[str, float] = {}
        for line in r.text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            if re.search(r"link|deliver|feedback|store|mlflow", name):
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    # ------------------------------------------------------------ the run

    async def run(self) -> int:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
            self.client = client
            self.t0 = time.monotonic()
            stop_sampling = asyncio.Event()
            sampler = asyncio.create_task(self.sampler(stop_sampling))
            disturbers = [asyncio.create_task(self.disturb(k)) for k in ("mlflow", "postgres")]
            log(f"load: {self.rate:g} chats/s over {len(self.users)} users for {self.seconds} s; "
                f"{self.flaps} MLflow flap(s), {self.pg_restarts} Postgres restart(s)")
            await self.load()
            self.load_end = self.now()
            log(f"load done at {self.load_end:.0f} s ({self.messages} chats); waiting for the last votes")
            # Planned to end before the load does; bounded by ctl's own waits.
            await asyncio.gather(*disturbers)
            self.events.sort(key=lambda e: e["at"])
            # Every vote task ends by itself (think times of seconds, settle deadline).
            while self.tasks:
                await asyncio.wait(set(self.tasks), timeout=150)
                if self.now() > self.seconds + 150:
                    for t in list(self.tasks):
                        t.cancel()
                    self.failures.append("vote tasks still running 150 s after the load; cancelled")
                    break
            log(f"all votes settled at {self.now():.0f} s; waiting for the outbox to drain")
            stats, drain_s = await self.drain()
            stop_sampling.set()
            await sampler
            log(f"outbox after {drain_s:.0f} s: {stats}; checking MLflow")
            await self.dump_outbox()
            injected = await self.tamper() if os.environ.get("SOAK_SELF_TEST") == "1" else None
            result = await self.check()
            if injected is not None:
                self.judge_self_test(injected, result["counts"])
            metrics = await self.metrics()
        return self.report(stats, drain_s, result, metrics)

    def slope(self, field_: str) -> dict[str, Any]:
        pts = [(s["t"], s[field_]) for s in self.samples if self.load_end and s["t"] <= self.load_end]
        if not pts:
            return {}
        half = [(t, v) for t, v in pts if t >= self.load_end / 2]
        out: dict[str, Any] = {"min": min(v for _, v in pts), "max": max(v for _, v in pts),
                               "end": self.samples[-1][field_]}
        if len(half) >= 3:
            mt = statistics.fmean(t for t, _ in half)
            mv = statistics.fmean(v for _, v in half)
            den = sum((t - mt) ** 2 for t, _ in half)
            out["slope_per_min"] = round(60 * sum((t - mt) * (v - mv) for t, v in half) / den, 2) if den else 0.0
            out["second_half_samples"] = len(half)
        return out

    def agent_discarded(self) -> int:
        """Traces the example agent itself dropped (its export queue overflowed): votes on
        them cannot be delivered, and that is the stand-in agent's failure, not the proxy's."""
        try:
            with open(self.args.agent_log, errors="replace") as f:
                return sum("trace will be discarded" in line for line in f)
        except OSError:
            return 0

    def report(self, stats, drain_s, result, metrics) -> int:
        c = result["counts"]
        accepted = sum(k.accepted for k in self.keys.values())
        delivered = stats is not None and stats.get("pending") == 0 and stats.get("waiting") == 0 \
            and stats.get("dead") == 0
        reasons = list(self.failures)
        for what in ("lost", "duplicated", "wrong", "retracted_but_present", "unexpected_assessments",
                     "unsettled", "trace_id_mismatch"):
            if c[what]:
                reasons.append(f"{c[what]} {what.replace('_', ' ')}")
        if not delivered:
            reasons.append(f"not everything delivered after {drain_s:.0f} s: {stats}")
        if self.unexpected:
            reasons.append(f"{len(self.unexpected)} unexpected answers")
        if c["checked"] == 0:
            reasons.append("no vote was checked against MLflow")
        lat = sorted(self.chat_seconds)
        q = (lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)) if lat else (lambda p: None)
        rep = {
            "ok": not reasons,
            "failures": reasons,
            "profile": self.args.profile,
            "seconds": self.seconds,
            "setup_seconds": self.args.setup_seconds,
            "wall_seconds": round(self.now(), 1),
            "rate_chats_per_s": self.rate,
            "users": len(self.users),
            "chats": {"sent": self.messages, "outcomes": self.chats.counts,
                      "seconds_p50": q(0.5), "seconds_p99": q(0.99), "seconds_max": lat[-1] if lat else None},
            "votes": {"requests": self.votes.counts, "accepted": accepted,
                      "mlflowStatus": self.mlflow_status.counts},
            "disturbances": self.events,
            "drain": {"seconds": round(drain_s, 1), "outbox": stats, "delivered": delivered,
                      "curve": self.drain_curve},
            "check": c,
            "rss_kib": self.slope("rss_kib"),
            "fds": self.slope("fds"),
            "samples": len(self.samples),
            "metrics": metrics,
            "agent_discarded_traces": self.agent_discarded(),
            "unexpected_answers": self.unexpected[:50],
            "details": result["details"],
        }
        with open(os.path.join(self.args.out, "report.json"), "w") as f:
            json.dump(rep, f, indent=2)
        with open(os.path.join(self.args.out, "samples.jsonl"), "w") as f:
            for s in self.samples:
                f.write(json.dumps(s) + "\n")
        text = render(rep)
        with open(os.path.join(self.args.out, "report.txt"), "w") as f:
            f.write(text)
        print(text, flush=True)
        return 0 if rep["ok"] else 1


def render(r: dict[str, Any]) -> str:
    c = r["check"]
    rss, fds = r["rss_kib"], r["fds"]
    ev = "; ".join(
        f"{e['kind']} at {e['at']:.0f} s ("
        + (f"down {e['down_s']:.0f} s, answering after {e['outage_s']:.0f} s" if "outage_s" in e
           else f"{e['took_s']:.1f} s") + ("" if e["ok"] else ", FAILED") + ")"
        for e in r["disturbances"]) or "none"
    lines = [
        f"soak: {r['seconds']} s at {r['rate_chats_per_s']:g} chats/s over {r['users']} users "
        f"({r['profile']} build; services ready in {r['setup_seconds']} s, run {r['wall_seconds']:.0f} s)",
        f"  disturbances: {ev}",
        f"  chats: {r['chats']['sent']} sent; {fmt(r['chats']['outcomes'])}; "
        f"time to [DONE] p50 {r['chats']['seconds_p50']} s, p99 {r['chats']['seconds_p99']} s",
        f"  vote requests: {fmt(r['votes']['requests'])}",
        f"  accepted: {r['votes']['accepted']}; mlflowStatus: {fmt(r['votes']['mlflowStatus'])}",
        f"  outbox after {r['drain']['seconds']:.0f} s: {fmt(r['drain']['outbox'] or {})}"
        f" -> {'everything delivered' if r['drain']['delivered'] else 'NOT everything delivered'}",
        f"  checked {c['checked']} keys on {c['traces']} traces: lost {c['lost']}, duplicated "
        f"{c['duplicated']}, wrong {c['wrong']}, retracted but present {c['retracted_but_present']}, "
        f"unexpected {c['unexpected_assessments']}, unsettled {c['unsettled']}",
        f"  votes without a trace id in the stream: {c['no_trace_id']} (not checkable), "
        f"{c['trace_id_from_proxy_only']} checked with the proxy's trace id; traces missing in MLflow: "
        f"{c['trace_missing_in_mlflow']}"
        + (f"; the AGENT discarded {r['agent_discarded_traces']} traces (its export queue was full:"
           " lower SOAK_RATE)" if r["agent_discarded_traces"] else ""),
        "  message links: recorded {:.0f}, dropped {:.0f}, failed {:.0f} (the proxy's counters)".format(
            *(r["metrics"].get(f"feedback_proxy_links_{k}_total", float("nan"))
              for k in ("recorded", "dropped")),
            r["metrics"].get("feedback_proxy_link_errors_total", float("nan"))),
        f"  RSS: {kib(rss.get('min'))} .. {kib(rss.get('max'))}, end {kib(rss.get('end'))}; slope over the "
        f"second half {rss.get('slope_per_min', '?')} KiB/min",
        f"  open fds: {fds.get('min')} .. {fds.get('max')}, end {fds.get('end')}; slope over the second half "
        f"{fds.get('slope_per_min', '?')} /min ({r['samples']} samples"
        + ("; too short a run for the slopes to mean much)" if r["seconds"] < 600 else ")"),
        "  result: " + ("PASS" if r["ok"] else "FAIL: " + "; ".join(r["failures"])),
    ]
    if r["details"]:
        lines.append("  first findings:")
        lines.extend("    " + d for d in r["details"][:20])
    if r["unexpected_answers"]:
        lines.append("  unexpected answers:")
        lines.extend("    " + d for d in r["unexpected_answers"][:10])
    return "\n".join(lines) + "\n"


def fmt(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if not isinstance(v, (list, dict))) or "-"


def kib(v) -> str:
    return "?" if v is None else f"{v / 1024:.1f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--proxy", required=True)
    p.add_argument("--proxy-pid", type=int, required=True)
    p.add_argument("--mlflow", required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--ctl", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--setup-seconds", type=int, default=0)
    p.add_argument("--agent-log", default="")
    p.add_argument("--profile", default="?")
    args = p.parse_args()
    for url in (args.proxy, args.mlflow):
        host = urllib.parse.urlsplit(url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"soak: only loopback addresses, not {url}")
    try:
        return asyncio.run(Soak(args).run())
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
