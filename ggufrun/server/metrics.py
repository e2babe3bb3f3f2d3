"""Server counters in the Prometheus text exposition format (version 0.0.4), without a client library.

Written to from two kinds of threads (the event loop and the engine threads), so every update
takes one lock; updates are a few dict operations, far cheaper than the token they count.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

# Time to first token, seconds: fine steps where a small model answers, coarse ones for big prompts.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW = 10.0  # seconds over which the tokens-per-second gauge is averaged


class Metrics:
    """Counters, gauges and one histogram; :meth:`render` writes them as Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._prompt_tokens: dict[str, int] = defaultdict(int)
        self._gen_tokens: dict[str, int] = defaultdict(int)
        self._finished: dict[tuple[str, str], int] = defaultdict(int)
        self._ttft_counts: dict[str, list[int]] = {}
        self._ttft_sum: dict[str, float] = defaultdict(float)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per engine step
        self._gauges: list[Callable[[], dict[str, dict[str, float]]]] = []

    def add_gauges(self, source: Callable[[], dict[str, dict[str, float]]]) -> None:
        """Register a callable returning {metric name: {model: value}}, read at each scrape."""
        self._gauges.append(source)

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[(route, str(status))] += 1

    def prompt(self, model: str, tokens: int) -> None:
        with self._lock:
            self._prompt_tokens[model] += tokens

    def generated(self, model: str, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._gen_tokens[model] += tokens
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def finished(self, model: str, reason: str) -> None:
        with self._lock:
            self._finished[(model, reason)] += 1

    def ttft(self, model: str, seconds: float) -> None:
        with self._lock:
            counts = self._ttft_counts.setdefault(model, [0] * (len(TTFT_BUCKETS) + 1))
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            self._ttft_sum[model] += seconds

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            total = sum(n for t, n in self._recent if t >= now - RATE_WINDOW)
        return total / RATE_WINDOW

    def render(self) -> str:
        """The whole exposition, one metric family after another."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str, rows: list[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                out.append(f"{name}{_labels(labels)} {_value(value)}")

        with self._lock:
            requests = sorted(self._requests.items())
            prompt = sorted(self._prompt_tokens.items())
            gen = sorted(self._gen_tokens.items())
            finished = sorted(self._finished.items())
            ttft = {m: list(c) for m, c in self._ttft_counts.items()}
            ttft_sum = dict(self._ttft_sum)
        family("ggufrun_requests_total", "counter", "HTTP requests by route and status code.",
               [({"route": r, "status": s}, n) for (r, s), n in requests])
        family("ggufrun_prompt_tokens_total", "counter", "Prompt tokens received.", [({"model": m}, n) for m, n in prompt])
        family("ggufrun_generated_tokens_total", "counter", "Tokens generated.", [({"model": m}, n) for m, n in gen])
        family("ggufrun_completions_total", "counter", "Generations ended, by finish reason.",
               [({"model": m, "reason": r}, n) for (m, r), n in finished])
        family("ggufrun_tokens_per_second", "gauge", f"Tokens generated per second over the last {RATE_WINDOW:.0f} s, all models.",
               [({}, self.tokens_per_second())])
        gauges: dict[str, dict[str, float]] = {}
        for source in self._gauges:
            for name, per_model in source().items():
                gauges.setdefault(name, {}).update(per_model)
        helps = {"ggufrun_queue_depth": "Requests waiting for a free slot.",
                 "ggufrun_active_requests": "Requests being generated.",
                 "ggufrun_model_loaded": "1 while the model is resident."}
        for name, per_model in sorted(gauges.items()):
            family(name, "gauge", helps.get(name, name), [({"model": m}, v) for m, v in sorted(per_model.items())])
        out.append("# HELP ggufrun_time_to_first_token_seconds Seconds from a request's arrival to its first token.")
        out.append("# TYPE ggufrun_time_to_first_token_seconds histogram")
        for model, counts in sorted(ttft.items()):
            running = 0
            for bound, n in zip((*TTFT_BUCKETS, float("inf")), counts):
                running += n
                le = "+Inf" if bound == float("inf") else _value(bound)
                out.append(f"ggufrun_time_to_first_token_seconds_bucket{_labels({'model': model, 'le': le})} {running}")
            out.append(f"ggufrun_time_to_first_token_seconds_sum{_labels({'model': model})} {_value(ttft_sum[model])}")
            out.append(f"ggufrun_time_to_first_token_seconds_count{_labels({'model': model})} {running}")
        return "\n".join(out) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(x: float) -> str:
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    return repr(float(x))
