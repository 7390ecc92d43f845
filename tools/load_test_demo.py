"""A bounded load test of the web demo: a fixed number of compare requests, a time limit, loopback only.

    python tools/load_test_demo.py --model exported/default --format tflite --requests 30 --concurrency 4 \
        [--max_megapixels 50]
    python tools/load_test_demo.py --url http://127.0.0.1:7860/ --server_pid 12345 --requests 30

Without --url it starts `python -m xcos_tf.demo` on a free 127.0.0.1 port (stopped with SIGTERM at
the end, as Ctrl-C would); with --url it talks to a running demo, which must be on 127.0.0.1 or
localhost (the tool never loads another machine). Requests go through the page's own API with
gradio_client, as the browser's Compare button does (upload two photos, run `on_compare`), from
--concurrency threads; each photo pair alternates between a same-person and a different-person
pair of the sample photos (--photos). One warm-up request is made and not counted.

Prints the machine and versions, successes and failures, latency p50/p95/max (the demo queues
requests: one compare runs at a time, so latency grows with concurrency), requests per second,
and the server's memory (VmRSS from /proc, sampled every 0.2 s: at the start, the peak and the
end) when the tool started it or was given --server_pid. A started demo gets --model, --format,
--detector and --max_megapixels. Exit code 1 if any request failed or the time limit cut the run
short; 2 (one `error:` line) for a bad flag or a demo that does not start.
"""
import logging
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import urllib.request

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from absl import flags  # noqa: E402

from tools import machine  # noqa: E402
from xcos_tf import cli  # noqa: E402

SAMPLES = REPO_ROOT / "exported" / "samples"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def define_flags():
    """The command-line flags, defined only when this file runs as the program."""
    return types.SimpleNamespace(
        url=flags.DEFINE_string("url", None, "A running demo on 127.0.0.1 / localhost; default: start one."),
        server_pid=flags.DEFINE_integer("server_pid", None, "With --url: the server's process id, for its memory."),
        model=cli.define_model("Export folder for the started demo.", default=str(REPO_ROOT / "exported" / "default")),
        format=cli.define_format("Format the started demo serves.", default="tflite"),
        detector=cli.define_detector("YuNet ONNX for the started demo."),
        max_megapixels=cli.define_max_megapixels(),
        photos=flags.DEFINE_list(
            "photos", [str(SAMPLES / f"{n}.jpg") for n in "ABC"],
            "Photos to compare: request i uses photos[0] and photos[1 + i % (len - 1)].",
        ),
        requests=flags.DEFINE_integer("requests", 30, "Counted requests.", lower_bound=1, upper_bound=10_000),
        concurrency=flags.DEFINE_integer("concurrency", 4, "Client threads.", lower_bound=1, upper_bound=64),
        time_limit=flags.DEFINE_float("time_limit", 300.0, "Seconds for all counted requests; the rest are dropped.",
                                      lower_bound=1.0),
        start_timeout=flags.DEFINE_float("start_timeout", 180.0, "Seconds to wait for a started demo to answer."),
    )


def describe_client():
    """The machine (`tools.machine`), its load and the client's versions."""
    import gradio_client

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{machine.describe()}, load average {load}; Python {platform.python_version()}, "
            f"gradio_client {gradio_client.__version__}")


def rss_mb(pid):
    """The process's resident memory in MB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return None


class MemorySampler(threading.Thread):
    def __init__(self, pid, period=0.2):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples = pid, period, []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append(value)
            self._stop_event.wait(self.period)

    def stop(self):
        self._stop_event.set()
        self.join()


def _free_loopback_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_demo(log_file, args):
    """(process, url) of `python -m xcos_tf.demo` on a free loopback port, once it answers."""
    port = _free_loopback_port()
    command = [sys.executable, "-m", "xcos_tf.demo", "--model", args.model.value, "--format", args.format.value,
               "--detector", args.detector.value, f"--max_megapixels={args.max_megapixels.value!r}",
               "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + args.start_timeout.value
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    stop_demo(process)
    raise RuntimeError(f"the demo did not answer at {url} within {args.start_timeout.value:g} s")


def stop_demo(process):
    if process.poll() is None:
        process.terminate()  # SIGTERM: the demo removes its upload folder
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_requests(url, photos, count, concurrency, time_limit):
    """(latencies in s of the successes, failure messages, requests not started in time)."""
    from gradio_client import Client, handle_file

    latencies, failures, lock = [], [], threading.Lock()
    next_index = iter(range(count))
    deadline = time.monotonic() + time_limit

    def worker():
        client = Client(url, verbose=False)
        while True:
            with lock:
                index = next(next_index, None)
            remaining = deadline - time.monotonic()
            if index is None or remaining <= 0:
                return
            pair = (handle_file(photos[0]), handle_file(photos[1 + index % (len(photos) - 1)]))
            start = time.perf_counter()
            try:
                client.submit(*pair, api_name="/on_compare").result(timeout=remaining)
            except Exception as error:  # a failed request is counted and reported, not fatal
                with lock:
                    failures.append(f"request {index}: {type(error).__name__}: {str(error)[:200]}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures, count - len(latencies) - len(failures)


def main(argv, args):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.max_pixels(args.max_megapixels.value)  # checked here, before a demo is started with it
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    if len(args.photos.value) < 2 or not all(os.path.isfile(p) for p in args.photos.value):
        raise cli.UserError(f"--photos: need two or more existing photos. Received: {args.photos.value}")
    process, log = None, None
    if args.url.value:
        host = urllib.parse.urlparse(args.url.value).hostname
        if host not in LOOPBACK_HOSTS:
            raise cli.UserError(f"--url must be on {' or '.join(LOOPBACK_HOSTS)}. Received host: {host!r}")
        url, pid = args.url.value, args.server_pid.value
    else:
        log = tempfile.NamedTemporaryFile(prefix="load_test_demo_", suffix=".log", delete=False)
        try:
            process, url = start_demo(log, args)
        except RuntimeError as error:
            log.close()
            raise cli.UserError(f"{error}; its log: {log.name}") from None
        pid = process.pid
    try:
        print(f"machine: {describe_client()}")
        print(f"server: {url}" + (f" (started: {args.model.value}, {args.format.value})" if process else ""))
        run_requests(url, args.photos.value, 1, 1, args.time_limit.value)  # warm-up, not counted
        sampler = MemorySampler(pid) if pid else None
        if sampler:
            sampler.start()
        started = time.perf_counter()
        latencies, failures, dropped = run_requests(
            url, args.photos.value, args.requests.value, args.concurrency.value, args.time_limit.value)
        elapsed = time.perf_counter() - started
        if sampler:
            sampler.stop()
    finally:
        if process is not None:
            stop_demo(process)
            log.close()
            os.unlink(log.name)
    print(f"requests: {args.requests.value} with concurrency {args.concurrency.value}, "
          f"time limit {args.time_limit.value:g} s")
    print(f"successes: {len(latencies)}  failures: {len(failures)}  not started in time: {dropped}")
    for failure in failures[:5]:
        print(f"  {failure}")
    if latencies:
        print(f"latency: p50 {percentile(latencies, 50):.2f} s  p95 {percentile(latencies, 95):.2f} s  "
              f"max {max(latencies):.2f} s;  {len(latencies) / elapsed:.2f} requests/s over {elapsed:.1f} s")
    if sampler and sampler.samples:
        samples = sampler.samples
        print(f"server memory (RSS): start {samples[0]:.0f} MB  peak {max(samples):.0f} MB  end {samples[-1]:.0f} MB")
    return 1 if failures or dropped else 0


if __name__ == "__main__":
    _ARGS = define_flags()
    cli.run(lambda argv: main(argv, _ARGS))
