"""`cifar-transfer serve` under load on this machine: batching's gain, latency, memory, hostile uploads.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_load.py RUN_DIR \
        [--data-dir ../shared/cifar10] [--clients 64] [--seconds 60] [--sequential-seconds 20] \
        [--rss-requests 1000,10000] [--json out.json] [--serve-options '--threads 1']

Starts the real server (`python -m cifar_transfer serve RUN_DIR --port FREE`) on 127.0.0.1 only,
then, with CIFAR-10 training images encoded as PNG (the 32x32 images as a client would send
them):

1. one client, one request at a time, for --sequential-seconds: the unbatched throughput;
2. --clients concurrent clients (httpx, async) for --seconds (and at most --max-requests
   requests): throughput, p50/p99 latency, failures; the server's batches from /health;
   meanwhile, every few seconds, a hostile upload (empty body, text, truncated JPEG, PNG bomb,
   wrong content type, a 200 MB body declared and a 200 MB body chunked): each must get its 4xx
   while the load's requests keep succeeding;
3. more concurrent load (if needed) until --rss-requests requests of it are reached: the
   server's RSS (VmRSS) after each (counted from the start of the concurrent phase, so the
   first milestone is already at full batches: growth after it would be a leak).

The CPU time other processes took meanwhile (the machine's busy time from /proc/stat less the
server's and this client's) is reported per phase, in cores.

Everything is bounded (duration and request caps, client timeouts) and the server is stopped
with SIGTERM at the end. Prints one line per figure and writes them all with --json. The load
generator shares the machine's cores with the server: on 2 cores its own CPU time is part of
what is measured (stated in BENCHMARKS.md). Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
from PIL import Image

from cifar_transfer.data.cifar10 import load_split, resolve_data_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far: the whole machine's busy time, the server's, this process's."""
    hz = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = os.times()
    return {"machine": busy / hz, "server": (int(stat[11]) + int(stat[12])) / hz,
            "client": own.user + own.system}  # fmt: skip


def foreign_cores(before: dict[str, float], after: dict[str, float], seconds: float) -> float:
    """Cores' worth of CPU that other processes used meanwhile (neither server nor client)."""
    other = (after["machine"] - before["machine"]) - (after["server"] - before["server"]) - (
        after["client"] - before["client"])
    return round(max(0.0, other) / seconds, 2)


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    c = zlib.compressobj(9)
    idat = b"".join(c.compress(row) for _ in range(height)) + c.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def hostile_uploads(jpeg: bytes) -> list[tuple[str, int, dict]]:
    """(name, expected status, httpx.post arguments)."""
    big = 200 * 1024 * 1024

    async def zeros(n: int):  # streamed: the client never holds 200 MB either
        for _ in range(n // (1 << 20)):
            yield b"\0" * (1 << 20)

    def raw(body, ctype="image/png", **headers):
        return {"content": body, "headers": {"content-type": ctype, **headers}}

    return [
        ("empty body", 422, raw(b"")),
        ("text file", 422, raw(b"not an image\n" * 100)),
        ("truncated JPEG", 422, raw(jpeg[: len(jpeg) // 2], "image/jpeg")),
        ("PNG bomb 20000x20000 (50 KB)", 422, raw(png_bomb(20000, 20000))),
        ("wrong content type", 415, raw(jpeg, "text/plain")),
        ("200 MB body, Content-Length", 413, raw(zeros(big), "image/png", **{"content-length": str(big)})),
        ("200 MB body, chunked", 413, raw(zeros(big))),
    ]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Load:
    """Counts every load request (status, latency) and samples the server's RSS at milestones."""

    def __init__(self, url: str, images: list[bytes], pid: int, rss_at: list[int]) -> None:
        self.url, self.images, self.pid = url, images, pid
        self.rss_at = sorted(rss_at)
        self.rss: dict[int, float] = {}
        self.total = 0  # requests counted towards the RSS milestones
        self.counting = False

    def _count(self) -> None:
        if not self.counting:
            return
        self.total += 1
        while self.rss_at and self.total >= self.rss_at[0]:
            self.rss[self.rss_at.pop(0)] = rss_mb(self.pid)

    async def run(self, clients: int, seconds: float, max_requests: int) -> dict:
        latencies: list[float] = []
        failures: list[str] = []
        deadline = time.monotonic() + seconds
        sent = 0
        async def worker(w: int) -> None:
            # One client (and connection) per worker: 64 clients, as 64 users would be; one
            # shared pool of 64 connections spends its time in the pool's bookkeeping instead.
            async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
                nonlocal sent
                i = w
                while time.monotonic() < deadline and sent < max_requests:
                    sent += 1
                    body = self.images[i % len(self.images)]
                    i += clients
                    t0 = time.perf_counter()
                    try:
                        r = await client.post("/predict", content=body,
                                              headers={"content-type": "image/png"})  # fmt: skip
                        ok = r.status_code == 200
                        if not ok:
                            failures.append(f"{r.status_code} {r.text.strip()[:100]}")
                    except httpx.HTTPError as e:
                        ok = False
                        failures.append(f"{type(e).__name__}: {e}")
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                    self._count()

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - t_start
        return {
            "clients": clients, "requests": len(latencies) + len(failures), "failed": len(failures),
            "failures": failures[:10], "seconds": round(elapsed, 2),
            "req_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * percentile(latencies, 50), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
        }  # fmt: skip


async def send_hostile(url: str, uploads: list[tuple[str, int, dict]], start_after: float,
                       every: float) -> list[dict]:  # fmt: skip
    """Each hostile upload once, `every` seconds apart, from its own connection."""
    await asyncio.sleep(start_after)
    results = []
    for name, expected, kwargs in uploads:
        t0 = time.perf_counter()
        try:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                r = await client.post("/predict", **kwargs)
            got, line = r.status_code, r.text.strip()
        except httpx.HTTPError as e:
            got, line = None, f"{type(e).__name__}: {e}"
        results.append({
            "upload": name, "expected": expected, "got": got, "ok": got == expected,
            "seconds": round(time.perf_counter() - t0, 3), "answer": line[:160],
        })  # fmt: skip
        await asyncio.sleep(every)
    return results


def machine() -> dict:
    info = {"python": platform.python_version(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, subprocess.SubprocessError):
        pass
    info["loadavg_before"] = os.getloadavg()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--data-dir", default="../shared/cifar10")
    ap.add_argument("--images", type=int, default=256, help="distinct images sent (PNG, 32x32)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the concurrent phase")
    ap.add_argument("--max-requests", type=int, default=50_000, help="cap of the concurrent phase")
    ap.add_argument("--sequential-seconds", type=float, default=20.0)
    ap.add_argument("--rss-requests", default="1000,10000",
                    help="server RSS after this many load requests (comma list)")
    ap.add_argument("--no-hostile", action="store_true")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--serve-options", default="", help="options for `serve`, e.g. '--threads 1'")
    args = ap.parse_args()

    x, _ = load_split(resolve_data_dir(args.data_dir), "train")
    images, jpeg = [], None
    for i in range(args.images):
        buf = io.BytesIO()
        Image.fromarray(x[-1 - i].permute(1, 2, 0).numpy()).save(buf, "PNG")
        images.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).resize((256, 256)).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()

    info = machine()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "cifar_transfer", "serve", args.run_dir, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *shlex.split(args.serve_options)]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    result: dict = {"command": " ".join(sys.argv), "serve": " ".join(cmd[1:]), "machine": info}
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start in 180 s")
            time.sleep(0.3)
        result["info"] = httpx.get(f"{url}/info").json()
        result["info"].pop("classes", None)
        print(f"model {result['info']['model']} ({result['info']['backbone']}, tta "
              f"{result['info']['tta']}); server pid {server.pid}; load avg {info['loadavg_before']}")
        load = Load(url, images, server.pid, [int(n) for n in args.rss_requests.split(",")])
        result["rss_mb_idle"] = round(rss_mb(server.pid), 1)

        asyncio.run(load.run(1, 5, 20))  # warm-up: allocations, first batches
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        seq = asyncio.run(load.run(1, args.sequential_seconds, 10**9))
        seq["other_processes_cores"] = foreign_cores(cpu0, cpu_seconds(server.pid), time.monotonic() - t0)
        result["rss_mb_after_sequential"] = round(rss_mb(server.pid), 1)
        print(f"sequential: {seq['req_per_s']} req/s, p50 {seq['p50_ms']} ms, p99 {seq['p99_ms']} ms, "
              f"{seq['failed']} failed of {seq['requests']}; other processes used "
              f"{seq['other_processes_cores']} cores meanwhile")
        before = httpx.get(f"{url}/health").json()

        async def concurrent_phase():
            load_task = load.run(args.clients, args.seconds, args.max_requests)
            if args.no_hostile:
                return await load_task, []
            hostile = send_hostile(url, hostile_uploads(jpeg), args.seconds * 0.1,
                                   args.seconds * 0.6 / 7)  # fmt: skip
            return await asyncio.gather(load_task, hostile)

        load.counting = True  # the RSS milestones count the concurrent load's requests
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        conc, hostile = asyncio.run(concurrent_phase())
        conc["other_processes_cores"] = foreign_cores(cpu0, cpu_seconds(server.pid), time.monotonic() - t0)
        after = httpx.get(f"{url}/health").json()
        batches = after["batches"] - before["batches"]
        conc["mean_batch"] = round((after["images"] - before["images"]) / batches, 2) if batches else None
        conc["largest_batch"] = after["largest_batch"]
        print(f"{args.clients} clients: {conc['req_per_s']} req/s, p50 {conc['p50_ms']} ms, p99 "
              f"{conc['p99_ms']} ms, {conc['failed']} failed of {conc['requests']}, mean batch "
              f"{conc['mean_batch']}; other processes used {conc['other_processes_cores']} cores meanwhile")
        ratio = conc["req_per_s"] / seq["req_per_s"] if seq["req_per_s"] else float("nan")
        print(f"throughput ratio concurrent/sequential: {ratio:.2f}x")
        for h in hostile:
            print(f"hostile: {h['upload']}: expected {h['expected']}, got {h['got']} in "
                  f"{h['seconds']} s {'ok' if h['ok'] else 'FAILED: ' + h['answer']}")
        extra = None
        target = max(int(n) for n in args.rss_requests.split(","))
        if load.total < target:  # more load until the last RSS milestone, bounded
            extra = asyncio.run(load.run(args.clients, 600, target - load.total))
        rss = {str(k): round(v, 1) for k, v in sorted(load.rss.items())}
        print(f"server RSS (MB): idle {result['rss_mb_idle']}, after the sequential phase "
              f"{result['rss_mb_after_sequential']}, after N concurrent requests {rss}")
        result.update(sequential=seq, concurrent=conc, ratio=round(ratio, 2), hostile=hostile,
                      extra_load=extra, rss_mb=rss, loadavg_after=os.getloadavg(),
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))  # fmt: skip
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        result["server_exit"] = server.returncode
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
