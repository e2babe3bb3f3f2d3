"""Soak and fault suite: a real `ggufrun serve` on loopback under mixed, hostile-ish load.

64 concurrent clients (by default) stream chat completions and post embedding batches against a
server with a small queue, so that the queue overflows and deliberate 503s are part of the load;
a fifth of the streams are dropped by the client mid-way (random disconnects); half-way through
the server gets SIGTERM and is started again on the same port. A prober hits /health twice a
second and the server's RSS is sampled every second.

It reports requests, outcomes, the worst stall (the longest gap between two chunks of one stream,
or the slowest /health answer) and RSS over time, and FAILS (exit 1) on:

* any error that is not a deliberate 503 (a 503 must carry Retry-After), a client's own
  disconnect, or a stream cut by the planned restart;
* any stall over 2 s (--max-stall);
* RSS growth over 10% (--max-rss-growth) after warm-up, per server process: the median RSS of
  the last 5 s against the median of the 5 s after warm-up (the first quarter of its life, at
  most 60 s);
* SIGTERM taking more than 10 s.

    python bench/soak.py                              # 10 minutes, a tiny synthetic model, 2 threads
    python bench/soak.py --minutes 3 --model ~/.cache/ggufrun-tests/gemma-3-270m-q4_k_m.gguf
    python bench/soak.py --minutes 1 --json soak.json  # the summary and RSS series as JSON too
    python bench/soak.py --model M.gguf --serve-arg=--n-gpu-layers --serve-arg=-1   # on a GPU
Only loopback is used; every loop is bounded by --minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # serverutil: the same server launcher the tests use
from serverutil import ServerProcess, free_port  # noqa: E402

WORDS = "river stone light cloud forest quiet north window garden paper silver morning".split()


@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    deliberate_503: int = 0
    client_disconnects: int = 0
    cut_by_restart: int = 0
    embeddings: int = 0
    errors: list[str] = field(default_factory=list)
    worst_stall: float = 0.0
    worst_stall_what: str = ""
    worst_health: float = 0.0
    worst_ttft: float = 0.0  # reported, not judged: it includes queueing
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, server generation, bytes)
    restart_seconds: float | None = None
    log_tails: list[str] = field(default_factory=list)  # the end of each server process's log

    def stall(self, seconds: float, what: str) -> None:
        if seconds > self.worst_stall:
            self.worst_stall, self.worst_stall_what = seconds, what


class Soak:
    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        self.args = args
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tally = Tally()
        self.generation = 0
        self.restarting = asyncio.Event()
        self.started = time.monotonic()
        self.deadline = self.started + args.minutes * 60
        self.server: ServerProcess | None = None

    def _start(self) -> ServerProcess:
        a = self.args
        srv = ServerProcess([str(self.model), "--parallel", str(a.parallel), "--max-queue", str(a.max_queue),
                             "--threads", str(a.threads), "--n-ctx", str(a.n_ctx), *a.serve_arg], port=self.port)
        srv.wait_ready(120)
        return srv

    def now(self) -> float:
        return time.monotonic() - self.started

    async def run(self) -> Tally:
        import httpx

        self.server = await asyncio.to_thread(self._start)
        limits = httpx.Limits(max_connections=self.args.clients + 8, max_keepalive_connections=self.args.clients + 8)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=httpx.Timeout(60, connect=5)) as http:
            tasks = [asyncio.create_task(self.client(http, i)) for i in range(self.args.clients)]
            tasks += [asyncio.create_task(self.prober(http)), asyncio.create_task(self.sampler()),
                      asyncio.create_task(self.reporter())]
            if not self.args.no_restart:
                tasks.append(asyncio.create_task(self.restart_midway()))
            await asyncio.gather(*tasks)
        self.tally.log_tails.append(self.server.log()[-self.args.log_tail:])
        await asyncio.to_thread(self.server.close)
        return self.tally

    # ---- load ------------------------------------------------------------------------------

    async def client(self, http: Any, i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < self.deadline:
            if self.restarting.is_set():
                await asyncio.sleep(0.1)
                continue
            generation = self.generation
            try:
                if rng.random() < self.args.embed_share:
                    await self.embed(http, rng)
                else:
                    await self.chat(http, rng, i)
            except Exception as exc:  # noqa: BLE001 (every failure is classified and counted)
                if self.restarting.is_set() or generation != self.generation:
                    self.tally.cut_by_restart += 1
                else:
                    self.tally.errors.append(f"{self.now():.1f}s client {i}: {type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.2)

    async def _overflowed(self, resp: Any) -> bool:
        """A 503 is deliberate when it says when to retry; then back off briefly."""
        if resp.status_code != 503:
            return False
        await resp.aread()
        retry = resp.headers.get("retry-after", "")
        if not retry.isdigit():
            self.tally.errors.append(f"{self.now():.1f}s 503 without a Retry-After in seconds: {resp.text[:200]}")
        else:
            self.tally.deliberate_503 += 1
        # honour it (capped, with jitter), as a well-behaved client would: a retry storm measures the client
        await asyncio.sleep(random.uniform(0.5, 1.0) * min(int(retry) if retry.isdigit() else 1, 2))
        return True

    async def chat(self, http: Any, rng: random.Random, i: int) -> None:
        generation = self.generation
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        body = {"messages": [{"role": "user", "content": f"Tell me about {words}."}], "stream": True,
                "max_tokens": rng.randint(8, 48), "temperature": 0.7, "seed": rng.randint(0, 10_000)}
        drop_after = rng.randint(1, 6) if rng.random() < 0.2 else None  # a client that gives up mid-stream
        self.tally.requests += 1
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if await self._overflowed(resp):
                return
            if resp.status_code != 200:
                await resp.aread()
                self.tally.errors.append(f"{self.now():.1f}s chat HTTP {resp.status_code}: {resp.text[:200]}")
                return
            chunks, last, done = 0, None, False
            sent = time.monotonic()
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                t = time.monotonic()
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    if event["error"].get("code") == 503 and (self.restarting.is_set() or generation != self.generation):
                        self.tally.cut_by_restart += 1  # "shutting down": the planned SIGTERM
                    else:
                        self.tally.errors.append(f"{self.now():.1f}s stream error: {json.dumps(event['error'])[:200]}")
                    return
                delta = (event.get("choices") or [{}])[0].get("delta", {})
                if not delta.get("content"):
                    continue  # the role chunk comes before the request leaves the queue: not a token
                # Time to the first token includes waiting in the queue (load, not a stall); after it,
                # every gap between tokens is the server failing to keep a stream going.
                if last is None:
                    self.tally.worst_ttft = max(self.tally.worst_ttft, t - sent)
                else:
                    self.tally.stall(t - last, f"gap between tokens at {self.now():.1f}s")
                last = t
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    self.tally.client_disconnects += 1
                    return  # leaving the block closes the connection mid-stream
            if not done:
                raise ConnectionError("stream ended without [DONE]")
            self.tally.ok += 1

    async def embed(self, http: Any, rng: random.Random) -> None:
        inputs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) for _ in range(rng.randint(1, 4))]
        self.tally.requests += 1
        resp = await http.post("/v1/embeddings", json={"input": inputs})
        if await self._overflowed(resp):
            return
        if resp.status_code != 200 or len(resp.json().get("data", [])) != len(inputs):
            self.tally.errors.append(f"{self.now():.1f}s embeddings HTTP {resp.status_code}: {resp.text[:200]}")
            return
        self.tally.ok += 1
        self.tally.embeddings += 1

    # ---- faults and probes -----------------------------------------------------------------

    async def restart_midway(self) -> None:
        await asyncio.sleep(max(self.deadline - time.monotonic(), 0) / 2)
        assert self.server is not None
        self.restarting.set()
        seconds = await asyncio.to_thread(self.server.stop)
        self.tally.restart_seconds = seconds
        if seconds > 10:
            self.tally.errors.append(f"SIGTERM took {seconds:.1f} s (more than 10)")
        self.tally.log_tails.append(self.server.log()[-self.args.log_tail:])
        log_tail = self.server.log()[-400:]
        if self.server.proc.returncode not in (0, -15):
            self.tally.errors.append(f"server exited with {self.server.proc.returncode} on SIGTERM: {log_tail}")
        await asyncio.to_thread(self.server.close)
        self.server = await asyncio.to_thread(self._start)
        self.generation += 1
        self.restarting.clear()

    async def prober(self, http: Any) -> None:
        while time.monotonic() < self.deadline:
            await asyncio.sleep(0.5)
            if self.restarting.is_set():
                continue
            generation = self.generation
            t0 = time.monotonic()
            try:
                resp = await http.get("/health")
                took = time.monotonic() - t0
                self.tally.worst_health = max(self.tally.worst_health, took)
                self.tally.stall(took, f"/health at {self.now():.1f}s")
                if resp.status_code != 200:
                    self.tally.errors.append(f"{self.now():.1f}s /health HTTP {resp.status_code}")
            except Exception as exc:  # noqa: BLE001
                if not self.restarting.is_set() and generation == self.generation:
                    self.tally.errors.append(f"{self.now():.1f}s /health: {type(exc).__name__}: {exc}")

    async def sampler(self) -> None:
        import psutil

        while time.monotonic() < self.deadline:
            srv = self.server
            if srv is not None and not self.restarting.is_set():
                try:
                    self.tally.rss.append((self.now(), self.generation, psutil.Process(srv.proc.pid).memory_info().rss))
                except psutil.Error:
                    pass
            await asyncio.sleep(1.0)

    async def reporter(self) -> None:
        while time.monotonic() < self.deadline:
            await asyncio.sleep(min(self.args.report_every, max(self.deadline - time.monotonic(), 0.1)))
            t = self.tally
            rss = t.rss[-1][2] / 2**20 if t.rss else 0
            print(f"{self.now():6.1f}s requests {t.requests:6d} ok {t.ok:6d} 503 {t.deliberate_503:5d} "
                  f"dropped {t.client_disconnects:4d} restart-cut {t.cut_by_restart:3d} errors {len(t.errors):3d} "
                  f"worst stall {t.worst_stall:5.2f}s rss {rss:7.1f} MB", flush=True)


def rss_growth(rss: list[tuple[float, int, int]]) -> dict[int, float]:
    """Per server generation: median RSS of its last 5 s over the median of the 5 s after warm-up."""
    out = {}
    for gen in sorted({g for _, g, _ in rss}):
        series = [(t, b) for t, g, b in rss if g == gen]
        if len(series) < 12:
            continue
        start, end = series[0][0], series[-1][0]
        warm = start + min(60.0, (end - start) / 4)
        base = [b for t, b in series if warm <= t < warm + 5]
        last = [b for t, b in series if t >= end - 5]
        if base and last:
            out[gen] = statistics.median(last) / statistics.median(base) - 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--model", type=Path, default=None, help="A GGUF file (default: a tiny synthetic qwen2).")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--max-stall", type=float, default=2.0)
    ap.add_argument("--max-rss-growth", type=float, default=0.10)
    ap.add_argument("--embed-share", type=float, default=0.2, help="Share of requests that are embedding batches.")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="An extra `ggufrun serve` argument (repeatable), e.g. --serve-arg=--n-gpu-layers --serve-arg=-1.")
    ap.add_argument("--no-restart", action="store_true")
    ap.add_argument("--report-every", type=float, default=10.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--log-tail", type=int, default=20000, help="Characters of each server log kept for --json.")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ggufrun-soak-") as tmp:
        model = args.model
        if model is None:
            from ggufrun.synthetic import write_synthetic

            model = write_synthetic(Path(tmp) / "tiny.gguf", "tiny", quant="q8_0")
        tally = asyncio.run(Soak(args, model).run())
    growth = rss_growth(tally.rss)
    failures = [*tally.errors[:20]]
    if len(tally.errors) > 20:
        failures.append(f"... and {len(tally.errors) - 20} more errors")
    if tally.worst_stall > args.max_stall:
        failures.append(f"worst stall {tally.worst_stall:.2f} s ({tally.worst_stall_what}) > {args.max_stall} s")
    for gen, g in growth.items():
        if g > args.max_rss_growth:
            failures.append(f"server {gen}: RSS grew {g:.1%} after warm-up (> {args.max_rss_growth:.0%})")
    summary = {"minutes": args.minutes, "model": str(args.model or "synthetic tiny"), "clients": args.clients,
               "parallel": args.parallel, "max_queue": args.max_queue, "requests": tally.requests, "ok": tally.ok,
               "embeddings": tally.embeddings, "deliberate_503": tally.deliberate_503,
               "client_disconnects": tally.client_disconnects, "cut_by_restart": tally.cut_by_restart,
               "errors": len(tally.errors), "worst_stall_s": round(tally.worst_stall, 3),
               "worst_stall_what": tally.worst_stall_what, "worst_health_s": round(tally.worst_health, 3),
               "worst_ttft_s": round(tally.worst_ttft, 3),
               "restart_seconds": tally.restart_seconds and round(tally.restart_seconds, 2),
               "rss_mb_first_last": [round(tally.rss[0][2] / 2**20, 1), round(tally.rss[-1][2] / 2**20, 1)] if tally.rss else None,
               "rss_growth_after_warmup": {str(k): round(v, 4) for k, v in growth.items()},
               "passed": not failures, "failures": failures}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**summary, "rss_series": tally.rss, "all_errors": tally.errors,
                                          "server_logs": tally.log_tails}, indent=1))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
