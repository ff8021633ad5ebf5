"""Times review queries through a running proxy: N sequential requests per query over one
keep-alive connection, as the reviewer; prints p50 / p99 / max in milliseconds.

Usage: timing.py BASE_URL REVIEWER N
"""
import http.client
import json
import sys
import time
import urllib.parse
from datetime import datetime, timedelta, timezone

base, reviewer, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
url = urllib.parse.urlsplit(base)
conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)


def get(path):
    conn.request("GET", path, headers={"x-forwarded-email": reviewer})
    res = conn.getresponse()
    body = res.read()
    if res.status != 200:
        raise SystemExit(f"{path}: {res.status} {body[:300]!r}")
    return json.loads(body)


def iso(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


now = datetime.now(timezone.utc)
month = f"from={iso(now - timedelta(days=30))}&to={iso(now)}"

# A cursor 20 pages deep into the negative votes, for a page in the middle of a walk.
cursor = None
for _ in range(20):
    page = get("/api/review/feedback?value=negative&limit=50" + (f"&cursor={cursor}" if cursor else ""))
    cursor = page["nextCursor"]

queries = [
    ("summary, 30 days, daily", f"/api/review/summary?{month}&bucket=day"),
    ("summary, 30 days, hourly", f"/api/review/summary?{month}&bucket=hour"),
    ("summary, 30 days, daily, name=rating", f"/api/review/summary?{month}&bucket=day&name=rating"),
    ("listing, first page of negatives", "/api/review/feedback?value=negative&limit=50"),
    ("listing, negatives 20 pages deep", f"/api/review/feedback?value=negative&limit=50&cursor={cursor}"),
    ("listing, negatives with a comment", "/api/review/feedback?value=negative&has_comment=true&limit=50"),
    ("listing, ratings on /responses", "/api/review/feedback?name=rating&route=%2Fresponses&limit=50"),
]
check = get(f"/api/review/summary?{month}&bucket=day")
print(f"    30-day summary: {check['total']['votes']} votes, negative rate {check['total']['negativeRate']:.3f}")
for label, path in queries:
    get(path)  # warm
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        get(path)
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    print(f"    {label:40s} p50 {p(0.50):7.2f} ms   p99 {p(0.99):7.2f} ms   max {samples[-1]:7.2f} ms")
