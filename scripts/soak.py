#!/usr/bin/env python3
"""Soak test of `serve` (issue #22): N concurrent clients for a bounded time, hostile requests
mixed in, against the tiny fixture model. Passes when no answer is a 5xx, every job that was
accepted ends done with a video identical to every other video of the same request (no
mixed-up results), and the server's RSS after the run is within 1.5x of its RSS when idle
(after one warm-up job). Standard library only.

    python3 scripts/soak.py [--clients 8] [--seconds 120] [--bin target/release/dynamicrafter]
"""
import argparse
import base64
import io
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(width, height, seed=0):
    """An RGB PNG of noise, made here (no imaging library)."""
    rnd = random.Random(seed)
    raw = b"".join(b"\0" + bytes(rnd.getrandbits(8) for _ in range(width * 3)) for _ in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Client:
    def __init__(self, url):
        self.url = url

    def call(self, method, path, body=None, headers=None):
        if method == "RAW":
            return self.headers_only(path, headers)
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return 0, str(e).encode()

    def headers_only(self, path, headers):
        """A POST that sends its headers and no body, and reads the answer."""
        import socket
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=30) as s:
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}\r\n".encode())
                answer = s.recv(65536)
        except OSError as e:
            return 0, str(e).encode()
        try:
            return int(answer.split(b" ", 2)[1]), answer
        except (IndexError, ValueError):
            return 0, answer

    def submit_json(self, fields):
        return self.call("POST", "/api/v1/jobs", json.dumps(fields).encode(), {"Content-Type": "application/json"})

    def wait(self, job_id, deadline):
        while time.time() < deadline:
            status, body = self.call("GET", f"/api/v1/jobs/{job_id}")
            if status != 200:
                return None
            view = json.loads(body)
            if view["state"] in ("done", "failed", "cancelled"):
                return view
            time.sleep(0.2)
        return None


IMAGE = base64.b64encode(png(96, 64, 1)).decode()
SEEDS = [11, 22, 33]


def hostile(rnd):
    """A request a hostile client might send, and the statuses that are a fair answer to it."""
    kind = rnd.randrange(8)
    if kind == 0:  # an elongated image whose resize would take gigabytes
        return ("POST", "/api/v1/jobs", json.dumps({"image": base64.b64encode(png(60000, 1)).decode()}).encode(), {"Content-Type": "application/json"})
    if kind == 1:  # not an image
        return ("POST", "/api/v1/jobs", json.dumps({"image": base64.b64encode(os.urandom(300)).decode()}).encode(), {"Content-Type": "application/json"})
    if kind == 2:  # knobs out of range
        return ("POST", "/api/v1/jobs", json.dumps({"image": IMAGE, "steps": 10**9, "cfg_scale": 1e308}).encode(), {"Content-Type": "application/json"})
    if kind == 3:  # malformed JSON
        return ("POST", "/api/v1/jobs", b'{"image": "' + b"A" * 5000, {"Content-Type": "application/json"})
    if kind == 4:  # a body far over the limit, declared (the server answers before reading it)
        return ("RAW", "/api/v1/jobs", None, {"Content-Type": "application/json", "Content-Length": str(60 << 20)})
    if kind == 5:  # a foreign origin
        return ("POST", "/api/v1/jobs", json.dumps({"image": IMAGE}).encode(), {"Content-Type": "application/json", "Origin": "http://evil.example"})
    if kind == 6:  # unknown jobs
        return (rnd.choice(["GET", "DELETE"]), "/api/v1/jobs/" + "f" * 32, None, {})
    return ("PUT", "/api/v1/jobs", b"", {})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--bin", default=None)
    args = ap.parse_args()
    binary = args.bin or next(p for p in [os.path.join(ROOT, "target/release/dynamicrafter"), os.path.join(ROOT, "target/debug/dynamicrafter")] if os.path.exists(p))
    data = tempfile.mkdtemp(prefix="dynamicrafter-soak-")
    server = subprocess.Popen([binary, "serve", "--model", "fixtures/tiny-v", "--port", "0", "--data-dir", data, "--max-queue", "6"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().strip().removeprefix("listening on ")
        client = Client(url)
        for _ in range(600):
            if client.call("GET", "/healthz")[0] == 200:
                break
            time.sleep(0.1)
        # Warm up: one job per seed, the reference videos.
        reference = {}
        for seed in SEEDS:
            status, body = client.submit_json({"image": IMAGE, "prompt": "waves", "steps": 2, "seed": seed})
            assert status == 202, (status, body)
            job = json.loads(body)["id"]
            view = client.wait(job, time.time() + 300)
            assert view and view["state"] == "done", view
            reference[seed] = client.call("GET", f"/api/v1/jobs/{job}/video")[1]
            client.call("DELETE", f"/api/v1/jobs/{job}")
        time.sleep(1)
        idle = rss_kb(server.pid)

        counts = {}
        errors = []
        lock = threading.Lock()
        end = time.time() + args.seconds

        def note(key):
            with lock:
                counts[key] = counts.get(key, 0) + 1

        def run(i):
            rnd = random.Random(i)
            c = Client(url)
            while time.time() < end:
                if rnd.random() < 0.5:
                    method, path, body, headers = hostile(rnd)
                    status, answer = c.call(method, path, body, headers)
                    note(f"hostile {status}")
                    if status >= 500 or status == 0:
                        errors.append(f"{method} {path}: {status} {answer[:200]!r}")
                    continue
                seed = rnd.choice(SEEDS)
                status, answer = c.submit_json({"image": IMAGE, "prompt": "waves", "steps": 2, "seed": seed})
                note(f"submit {status}")
                if status == 429:
                    time.sleep(0.5)
                    continue
                if status != 202:
                    errors.append(f"submit: {status} {answer[:200]!r}")
                    continue
                job = json.loads(answer)["id"]
                if rnd.random() < 0.2:
                    c.call("POST", f"/api/v1/jobs/{job}/cancel")
                view = c.wait(job, time.time() + 600)
                if view is None or view["state"] not in ("done", "cancelled"):
                    errors.append(f"job {job}: {view}")
                    continue
                note(view["state"])
                if view["state"] == "done":
                    status, video = c.call("GET", f"/api/v1/jobs/{job}/video")
                    if status != 200 or video != reference[seed]:
                        errors.append(f"job {job} (seed {seed}): video {status}, {len(video)} bytes, not the reference")
                c.call("DELETE", f"/api/v1/jobs/{job}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(2)
        after = rss_kb(server.pid)
        ratio = after / idle
        print(json.dumps({"clients": args.clients, "seconds": args.seconds, "answers": counts,
                          "idle_rss_mb": round(idle / 1024, 1), "after_rss_mb": round(after / 1024, 1),
                          "rss_ratio": round(ratio, 2), "errors": errors[:20], "error_count": len(errors)}, indent=1))
        ok = not errors and ratio <= 1.5 and counts.get("done", 0) > 0
        print("soak passed" if ok else "soak FAILED")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait(timeout=60)
        subprocess.run(["rm", "-rf", data])


if __name__ == "__main__":
    sys.exit(main())
