"""Drain-rate benchmark (issue 14): how fast the proxy delivers a backlog of votes to a real
`mlflow server`, against the best create rate a direct client achieves on the same server in
the same run.

  python bench/drain/drain.py --mlflow URL --experiment ID --proxy BIN --dir DIR [--votes 2000]

1. Direct baseline: for each concurrency in --concurrency, a fresh set of traces and `--votes`
   assessment creates (POST /api/3.0/mlflow/traces/{id}/assessments, the body the proxy sends)
   from an asyncio httpx client; the best rate wins.
2. Proxy: the same number of votes, on their own traces, cast through the proxy's API while it
   runs without MLflow (each is stored and held as `no_experiment_id`); then the proxy is
   restarted with MLflow configured, which releases the backlog, and the time from that start
   to the last delivery is measured (from /metrics: deliveries{state="done"}).

The links from message to trace are written into the proxy's SQLite store directly, as the
streaming path would have written them (chatting 2,000 times through the agent would measure
the agent, not the drain). Prints one JSON line with the figures; loopback only.
"""

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import mlflow


def make_traces(n):
    ids = []
    for i in range(n):
        with mlflow.start_span(name=f"drain-{i}") as span:
            span.set_inputs({"q": i})
            span.set_outputs({"a": i})
        ids.append(span.trace_id)
    if hasattr(mlflow, "flush_trace_async_logging"):
        mlflow.flush_trace_async_logging()
    return ids


def assessment_body(trace_id, user, value):
    return {
        "assessment": {
            "trace_id": trace_id,
            "assessment_name": "user_feedback",
            "source": {"source_type": "HUMAN", "source_id": user},
            "feedback": {"value": value},
        }
    }


async def wait_traces(client, base, ids):
    for t in ids:
        for _ in range(600):
            r = await client.get(f"{base}/api/3.0/mlflow/traces/{t}")
            if r.status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit(f"trace {t} never appeared")


async def direct(base, votes, concurrency, traces_per_run):
    best = None
    rows = []
    async with httpx.AsyncClient(timeout=30, trust_env=False, limits=httpx.Limits(max_connections=128)) as client:
        for c in concurrency:
            ids = make_traces(traces_per_run)
            await wait_traces(client, base, ids)
            jobs = asyncio.Queue()
            for i in range(votes):
                jobs.put_nowait((ids[i % len(ids)], f"direct-{c}-{i}@example.com", i % 2 == 0))
            errors = 0

            async def worker():
                nonlocal errors
                while True:
                    try:
                        t, u, v = jobs.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    r = await client.post(f"{base}/api/3.0/mlflow/traces/{t}/assessments", json=assessment_body(t, u, v))
                    if r.status_code != 200:
                        errors += 1

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(c)))
            secs = time.perf_counter() - start
            rate = votes / secs
            rows.append({"concurrency": c, "seconds": round(secs, 2), "rate": round(rate, 1), "errors": errors})
            print(f"direct c={c}: {rate:.1f} creates/s ({errors} errors)", file=sys.stderr)
            if errors == 0 and (best is None or rate > best["rate"]):
                best = rows[-1]
    return best, rows


def proxy_config(path, store, port, mlflow_url=None, experiment=None, extra=""):
    text = (
        "listen = \"127.0.0.1:%d\"\n[identity]\ntrust_forwarded_headers = true\n"
        "[agent]\nurl = \"http://127.0.0.1:9\"\n[store]\nurl = \"sqlite://%s\"\n"
        "[metrics]\non_main_port = true\n[feedback.rate_limit]\nper_second = 0\n" % (port, store)
    )
    if mlflow_url:
        text += "[mlflow]\ntracking_uri = \"%s\"\nexperiment_id = \"%s\"\n" % (mlflow_url, experiment)
    text += extra
    with open(path, "w") as f:
        f.write(text)


def start_proxy(binary, config, log):
    out = open(log, "ab")
    # The MLflow client sets MLFLOW_TRACKING_URI in this process's environment, and the proxy
    # reads MLFLOW_* as defaults: keep them from it, so that the first phase has no MLflow.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.Popen([binary, "serve", "--config", config], stdout=out, stderr=out, env=env, start_new_session=True)


def stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


async def wait_up(url, p, secs=60):
    async with httpx.AsyncClient(timeout=2, trust_env=False) as c:
        t = time.monotonic()
        while time.monotonic() - t < secs:
            if p.poll() is not None:
                raise SystemExit("the proxy exited; see its log")
            try:
                if (await c.get(url + "/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    raise SystemExit("the proxy did not start")


def done_count(text):
    for line in text.splitlines():
        if line.startswith('feedback_proxy_deliveries{') and 'state="done"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def through_proxy(args, base, votes):
    os.makedirs(args.dir, exist_ok=True)
    store = os.path.join(args.dir, "drain.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(store + suffix):
            os.remove(store + suffix)
    port = args.port
    url = f"http://127.0.0.1:{port}"
    cfg = os.path.join(args.dir, "drain.toml")
    log = os.path.join(args.dir, "proxy.log")
    ids = make_traces(args.traces)
    async with httpx.AsyncClient(timeout=30, trust_env=False, limits=httpx.Limits(max_connections=64)) as client:
        await wait_traces(client, base, ids)
        # 1. Without MLflow: votes are stored and held.
        proxy_config(cfg, store, port)
        p = start_proxy(args.proxy, cfg, log)
        try:
            await wait_up(url, p)
            db = sqlite3.connect(store)
            now = int(time.time() * 1000)
            db.executemany(
                "INSERT INTO message_links (message_id, chat_id, user_id, trace_id, open, created_at, updated_at)"
                " VALUES (?, 'drain', ?, ?, 0, ?, ?)",
                [(f"drain-m-{i}", f"drain-{i}@example.com", ids[i % len(ids)], now, now) for i in range(votes)],
            )
            db.commit()
            db.close()
            sem = asyncio.Semaphore(32)

            async def cast(i):
                async with sem:
                    r = await client.post(
                        url + "/api/feedback",
                        headers={"x-forwarded-email": f"drain-{i}@example.com"},
                        json={"chatId": "drain", "messageId": f"drain-m-{i}", "isUpvoted": i % 2 == 0},
                    )
                    if r.status_code != 200:
                        raise SystemExit(f"vote {i}: {r.status_code} {r.text}")

            await asyncio.gather(*(cast(i) for i in range(votes)))
        finally:
            stop(p)
        # 2. With MLflow: the held backlog is released at start and drained.
        proxy_config(cfg, store, port, base, args.experiment, args.proxy_extra)
        start = time.perf_counter()
        p = start_proxy(args.proxy, cfg, log)
        try:
            await wait_up(url, p)
            while True:
                r = await client.get(url + "/metrics")
                done = done_count(r.text)
                if done >= votes:
                    break
                if time.perf_counter() - start > args.timeout:
                    raise SystemExit(f"only {done} of {votes} delivered within {args.timeout}s")
                await asyncio.sleep(0.05)
            secs = time.perf_counter() - start
            limit_line = [l for l in r.text.splitlines() if l.startswith("feedback_proxy_delivery_concurrency_limit")]
        finally:
            stop(p)
    rate = votes / secs
    print(f"proxy drain: {votes} votes in {secs:.2f}s = {rate:.1f}/s", file=sys.stderr)
    return {"seconds": round(secs, 2), "rate": round(rate, 1), "final_limit": limit_line[0].split()[-1] if limit_line else None}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mlflow", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--votes", type=int, default=2000)
    ap.add_argument("--traces", type=int, default=40)
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--proxy-extra", default="")
    args = ap.parse_args()
    mlflow.set_tracking_uri(args.mlflow)
    mlflow.set_experiment(experiment_id=args.experiment)
    conc = [int(c) for c in args.concurrency.split(",")]
    best, rows = await direct(args.mlflow, args.votes, conc, args.traces)
    proxy = await through_proxy(args, args.mlflow, args.votes)
    ratio = proxy["rate"] / best["rate"] if best else None
    print(json.dumps({"votes": args.votes, "direct": rows, "direct_best": best, "proxy": proxy,
                      "ratio": round(ratio, 3) if ratio else None}))


if __name__ == "__main__":
    asyncio.run(main())
