#!/usr/bin/env python3
"""Bounded load test of `neoxq serve` (issue 15): N concurrent clients for T seconds against
127.0.0.1. Every request must be answered (200) or refused with 503/429 and a Retry-After header;
none may be lost (time out or fail otherwise); the server's resident memory must stay flat.

    .venv/bin/python scripts/load_serve.py MODEL.gguf [--clients 80] [--seconds 20] [--ctx 256]
"""

from __future__ import annotations

import argparse
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
    a = ap.parse_args()
    server, base = start_server(a.model, a.ctx)
    url = f"{base}/v1/completions"
    httpx.post(url, json={"prompt": "warm up", "max_tokens": 4}, timeout=60)
    rss0 = rss_mib(server.pid)
    counts, latencies, lock = Counter(), [], threading.Lock()
    stop_at = time.time() + a.seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as c:
            while time.time() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = c.post(url, json={"prompt": f"Client {i} asks:", "max_tokens": 8, "temperature": 0.7})
                    kind = "200" if r.status_code == 200 else (f"{r.status_code}+retry-after" if r.status_code in (429, 503) and "retry-after" in r.headers else f"bad {r.status_code}")
                except httpx.HTTPError as exc:
                    kind = f"lost ({type(exc).__name__})"
                with lock:
                    counts[kind] += 1
                    latencies.append(time.perf_counter() - t0)
                if kind != "200":
                    time.sleep(1.0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss1 = rss_mib(server.pid)
    server.terminate()
    server.wait(timeout=30)
    total = sum(counts.values())
    lat = sorted(latencies)
    print(f"{a.clients} clients for {a.seconds:.0f} s: {total} requests: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print(f"latency median {1e3 * lat[len(lat) // 2]:.0f} ms, p99 {1e3 * lat[int(0.99 * (len(lat) - 1))]:.0f} ms; "
          f"server RSS {rss0:.0f} → {rss1:.0f} MiB ({rss1 - rss0:+.0f})")
    lost = sum(v for k, v in counts.items() if k.startswith(("lost", "bad")))
    print("every request answered or refused with Retry-After: " + ("yes" if lost == 0 else f"NO, {lost} lost"))


if __name__ == "__main__":
    main()
