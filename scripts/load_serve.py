#!/usr/bin/env python3
"""Bounded load test of `neoxq serve`, and its soak: N concurrent
clients for T seconds against 127.0.0.1, a share of them streaming. Every request must be answered
(200, a streamed one ending in `data: [DONE]`) or refused with 503/429 and a Retry-After header;
none may be lost (time out or fail otherwise). Printed: the counts, latency, the server's resident
memory sampled every 10 s, and for a soak the p99 latency of the last window against the first.

    .venv/bin/python scripts/load_serve.py MODEL.gguf [--clients 80] [--seconds 20] [--ctx 256]
    .venv/bin/python scripts/load_serve.py MODEL.gguf --clients 16 --seconds 1800 --window 300 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from pathlib import Path

from benchlib import start_server


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--clients", type=int, default=80)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--window", type=float, default=None, help="soak: compare the p99 latency of the last window with the first")
    ap.add_argument("--stream-share", type=float, default=0.25, help="share of clients that stream")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    server, base = start_server(a.model, a.ctx)
    url = f"{base}/v1/completions"
    httpx.post(url, json={"prompt": "warm up", "max_tokens": 4}, timeout=60)
    rss0 = rss_mib(server.pid)
    counts, records, lock = Counter(), [], threading.Lock()
    start = time.time()
    stop_at = start + a.seconds
    rss_samples = [(0.0, rss0)]

    def one(c, i: int, stream: bool) -> str:
        body = {"prompt": f"Client {i} asks:", "max_tokens": 8, "temperature": 0.7, "stream": stream}
        if not stream:
            r = c.post(url, json=body)
            return _kind(r.status_code, r.headers)
        with c.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return _kind(r.status_code, r.headers)
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            return "200" if lines and lines[-1] == "data: [DONE]" else "bad stream (no [DONE])"

    def client(i: int) -> None:
        stream = i < a.stream_share * a.clients
        with httpx.Client(timeout=120) as c:
            while time.time() < stop_at:
                t0, w0 = time.perf_counter(), time.time()
                try:
                    kind = one(c, i, stream)
                except httpx.HTTPError as exc:
                    kind = f"lost ({type(exc).__name__})"
                with lock:
                    counts[kind] += 1
                    records.append((w0 - start, time.perf_counter() - t0, kind))
                if kind != "200":
                    time.sleep(1.0)

    def sample_rss() -> None:
        while time.time() < stop_at:
            time.sleep(10)
            rss_samples.append((time.time() - start, rss_mib(server.pid)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)] + [threading.Thread(target=sample_rss, daemon=True)]
    for t in threads:
        t.start()
    for t in threads[:-1]:
        t.join()
    rss1 = rss_mib(server.pid)
    latencies = [r[1] for r in records]
    server.terminate()
    server.wait(timeout=30)
    total = sum(counts.values())
    lat = sorted(latencies)
    print(f"{a.clients} clients for {a.seconds:.0f} s: {total} requests: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print(
        f"latency median {1e3 * lat[len(lat) // 2]:.0f} ms, p99 {1e3 * lat[int(0.99 * (len(lat) - 1))]:.0f} ms; "
        f"server RSS {rss0:.0f} → {rss1:.0f} MiB ({rss1 - rss0:+.0f})"
    )
    lost = sum(v for k, v in counts.items() if k.startswith(("lost", "bad")))
    print("every request answered or refused with Retry-After: " + ("yes" if lost == 0 else f"NO, {lost} lost"))
    out = {
        "clients": a.clients,
        "seconds": a.seconds,
        "counts": dict(counts),
        "lost": lost,
        "rss_mib": rss_samples + [(a.seconds, rss1)],
        "p50_ms": 1e3 * lat[len(lat) // 2],
        "p99_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))],
    }
    if a.window:
        first = _p99([r for r in records if r[0] < a.window])
        last = _p99([r for r in records if r[0] >= a.seconds - a.window])
        base = next(v for t, v in rss_samples if t >= min(60.0, a.seconds / 2)) if len(rss_samples) > 1 else rss0
        growth = (rss1 - base) / base
        out.update(
            {"p99_first_window_ms": first, "p99_last_window_ms": last, "p99_ratio": last / first, "rss_after_1min_mib": base, "rss_growth": growth}
        )
        print(
            f"soak: p99 of answered requests, first {a.window:.0f} s {first:.0f} ms, last {a.window:.0f} s {last:.0f} ms "
            f"({last / first:.2f}x); RSS after 1 min {base:.0f} MiB, at the end {rss1:.0f} MiB ({100 * growth:+.1f} %)"
        )
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


def _kind(status: int, headers) -> str:
    if status == 200:
        return "200"
    return f"{status}+retry-after" if status in (429, 503) and "retry-after" in headers else f"bad {status}"


def _p99(rows) -> float:
    lat = sorted(r[1] for r in rows if r[2] == "200")
    return 1e3 * lat[int(0.99 * (len(lat) - 1))] if lat else float("nan")


if __name__ == "__main__":
    main()
