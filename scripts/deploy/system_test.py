#!/usr/bin/env python3
"""The bundle, installed and run as the image runs it.

    system_test.py --bundle faas-async-*.tar.gz

1. Unpacks the bundle and runs its install.sh into a temporary prefix inside a network
   namespace with no network at all (so an install that reached for the network fails).
2. systemd-analyze verify (and an exposure score) on the units as install.sh wrote them.
3. Starts the bundle's nats-server, then gateway-plugin, queue-worker and (separately)
   faas-async from the installed prefix in scripts/deploy/sandbox.sh: read-only root, no
   shell, state and temp only on the two image volumes, the Dockerfile's ENV and WORKDIR, a
   non-root UID with group 0 (the image's USER and an OpenShift-style arbitrary UID).
4. A workload through each: async calls called back (a round trip), a retried call, a failed
   one, a call whose callback fails (dead letter), an expired one, a refused request; then
   GET /async-calls/{id}.
5. Scrapes /metrics of all three and checks that the Grafana dashboard and the chart's
   PrometheusRule name only metrics the binaries exported.
6. SIGTERM: every process stops on its own with status 0, within its drain.
Also: a state directory outside the volumes must fail (the root really is read-only).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promql_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = ROOT / "scripts" / "deploy" / "sandbox.sh"
IMAGE_UID = 65532  # the Dockerfile's USER
ARBITRARY_UID = 1000680000  # as OpenShift assigns from a namespace's range


def log(msg: str) -> None:
    print(f"    {msg}", flush=True)


def fail(msg: str) -> None:
    raise SystemExit(f"FAIL system test: {msg}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_env() -> tuple[dict[str, str], str, str]:
    """ENV, WORKDIR and USER of the Dockerfile's last stage."""
    text = (ROOT / "Dockerfile").read_text()
    last = text[text.rindex("\nFROM ") :]
    env = dict(re.findall(r"^ENV ([A-Z_]+)=(\S+)$", last, re.M))
    workdir = re.search(r"^WORKDIR (\S+)$", last, re.M).group(1)
    user = re.search(r"^USER (\S+)$", last, re.M).group(1)
    if not env or ":" not in user or not user.split(":")[0].isdigit():
        fail(f"the Dockerfile's USER {user!r} must be numeric uid:gid, and ENV lines K=V")
    for path in (env.get("FAAS_ASYNC_QUEUE_DIR", ""), env.get("QUEUE_WORKER_STATE_DIR", "")):
        if not path.startswith("/var/lib/faas-async/"):
            fail(f"image state path {path!r} is not on the /var/lib/faas-async volume")
    return env, workdir, user


# --- the function and the callback receiver --------------------------------------------------


class Peer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.callbacks: dict[str, dict] = {}
        self.attempts: dict[str, int] = {}
        self.cond = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_callback(self, call_id: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while call_id not in self.callbacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    fail(f"no callback for call {call_id} within {timeout}s")
                self.cond.wait(left)
            return self.callbacks[call_id]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Peer

    def log_message(self, *_args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"", ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        call_id = self.headers.get("X-Call-Id", "")
        if self.path.startswith("/function/"):
            name = self.path.split("/")[2]
            with self.server.cond:
                self.server.attempts[call_id] = self.server.attempts.get(call_id, 0) + 1
                n = self.server.attempts[call_id]
            if name == "echo":
                return self._answer(200, body, "application/json")
            if name == "flaky":  # retryable once, then fine
                return self._answer(503 if n == 1 else 200, b'{"attempt": %d}' % n, "application/json")
            if name == "bad":
                return self._answer(400, b"bad input")
            if name == "old":  # max age 1 ms: a delivery fast enough to run it is retried, then expires
                return self._answer(503, b"too young to expire")
            return self._answer(404, b"no such function")
        if self.path.startswith("/callback"):
            if self.path == "/callback-gone":
                return self._answer(410)  # ends the delivery: callback failed
            with self.server.cond:
                self.server.callbacks[call_id] = {
                    "status": self.headers.get("X-Function-Status"),
                    "error": self.headers.get("X-Function-Error"),
                    "reason": self.headers.get("X-Dead-Letter-Reason"),
                    "body": body,
                }
                self.server.cond.notify_all()
            return self._answer(200)
        return self._answer(404)


# --- processes -------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, grace: float) -> int:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                self.log.close()
                fail(f"{self.name} did not stop within {grace}s of SIGTERM\n{self.tail()}")
        self.log.close()
        return self.p.returncode


def sandboxed(name: str, binary: Path, uid: int, vol: Path, env: dict[str, str], logdir: Path, workdir: str) -> Proc:
    state, tmp = vol / "state", vol / "tmp"
    for d in (state, tmp):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, 0, 0)
        os.chmod(d, 0o770)  # group 0, group-writable: what an arbitrary UID in group 0 needs
    argv = [str(SANDBOX), "--uid", str(uid), "--state", str(state), "--tmp", str(tmp),
            "--binary", str(binary), "--workdir", workdir, "--"]
    full_env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(vol)} | env
    return Proc(name, argv, full_env, logdir)


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url: str, proc: Proc, timeout: float = 30, want: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            fail(f"{proc.name} exited with {proc.p.returncode}\n{proc.tail()}")
        try:
            if http_get(url, 2)[0] == want:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    fail(f"{url} did not answer {want} within {timeout}s\n{proc.tail()}")


def submit(gw: str, function: str, body: bytes, callback: str | None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"{gw}/async-function/{function}", data=body, method="POST")
    if callback:
        req.add_header("X-Callback-Url", callback)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("X-Call-Id", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, "", e.read()


def workload(gw: str, peer: Peer, label: str) -> None:
    cb = f"{peer.url}/callback"
    st, ok_id, _ = submit(gw, "echo", b'{"n": [1, 2, 3]}', cb)
    if st != 202 or not ok_id:
        fail(f"{label}: POST /async-function/echo answered {st}")
    st, flaky_id, _ = submit(gw, "flaky", b"{}", cb)
    st2, bad_id, _ = submit(gw, "bad", b"x", cb)
    st3, gone_id, _ = submit(gw, "echo", b"{}", f"{peer.url}/callback-gone")
    st4, old_id, _ = submit(gw, "old", b"{}", cb)
    if (st, st2, st3, st4) != (202, 202, 202, 202):
        fail(f"{label}: submissions answered {(st, st2, st3, st4)}")
    st5, _, body = submit(gw, "not*a*name", b"{}", None)
    if st5 != 400:
        fail(f"{label}: an invalid function name answered {st5}, not 400")

    got = peer.wait_callback(ok_id)
    if got["status"] != "200" or json.loads(got["body"]) != {"n": [1, 2, 3]}:
        fail(f"{label}: round trip callback {got}")
    log(f"{label}: round trip: 202 {ok_id} -> callback 200 with the function's body")
    got = peer.wait_callback(flaky_id)
    if got["status"] != "200" or peer.attempts.get(flaky_id) != 2:
        fail(f"{label}: retried call: {got}, attempts {peer.attempts.get(flaky_id)}")
    got = peer.wait_callback(bad_id)
    if got["status"] != "400":
        fail(f"{label}: failed call: {got}")
    got = peer.wait_callback(old_id)
    if got["reason"] != "expired":
        fail(f"{label}: expired call: {got}")
    # The call whose callback is gone ends in the dead letters.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st, rec = http_get(f"{gw}/async-calls/{gone_id}")
        if st == 200 and json.loads(rec)["state"] == "dead_lettered":
            break
        time.sleep(0.2)
    else:
        fail(f"{label}: the call with a failing callback is not dead-lettered: {st} {rec[:300]!r}")
    st, rec = http_get(f"{gw}/async-calls/{ok_id}")
    if st != 200 or json.loads(rec)["state"] != "succeeded":
        fail(f"{label}: GET /async-calls/{ok_id}: {st} {rec[:300]!r}")
    log(f"{label}: retried, failed, expired, dead-lettered and refused calls as expected")


# --- the test --------------------------------------------------------------------------------


def help_env_names(binary: Path) -> set[str]:
    out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)", out))


def check_units(unit_dir: Path, bin_dir: Path) -> None:
    units = sorted(unit_dir.glob("*.service"))
    if len(units) < 4:
        fail(f"only {len(units)} units installed")
    r = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    noise = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    if r.returncode != 0 or noise:
        fail("systemd-analyze verify:\n" + "\n".join(noise))
    for u in units:
        text = u.read_text()
        for need in ("ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure",
                     "StateDirectory=", "CapabilityBoundingSet=\n", "PrivateTmp=yes",
                     "ProtectHome=yes", "SystemCallFilter=@system-service"):
            if need not in text:
                fail(f"{u.name}: no {need.strip()}")
        settings = "--config " if u.name == "faas-async-nats.service" else "EnvironmentFile="
        if settings not in text:
            fail(f"{u.name}: its settings do not come from a file ({settings.strip()})")
        if "DynamicUser=yes" not in text and not re.search(r"^User=\S+", text, re.M):
            fail(f"{u.name}: neither DynamicUser=yes nor a dedicated User=")
        exec_start = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
        if Path(exec_start).parent != bin_dir:
            fail(f"{u.name}: ExecStart {exec_start} is not in the installed {bin_dir}")
        if Path(exec_start).name != "nats-server":
            known = help_env_names(Path(exec_start))
            for env_file in re.findall(r"^EnvironmentFile=(\S+)$", text, re.M):
                names = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=", Path(env_file).read_text(), re.M))
                if names - known:
                    fail(f"{u.name}: {env_file} sets {sorted(names - known)}, which {Path(exec_start).name} does not read")
        stop = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
        drains = []
        for env_file in re.findall(r"^EnvironmentFile=(\S+)$", text, re.M):
            drains += [int(x) for x in re.findall(r"SHUTDOWN_GRACE=(\d+)s", Path(env_file).read_text())]
        if not stop or any(int(stop.group(1)) <= d for d in drains):
            fail(f"{u.name}: TimeoutStopSec {stop and stop.group(1)} not above the drain {drains}")
        sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(u)], capture_output=True, text=True)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout)
        if not m or float(m.group(1)) > 2.0:
            fail(f"{u.name}: systemd-analyze security exposure {m and m.group(1)} (want <= 2.0)\n{sec.stdout[-1500:]}")
        log(f"{u.name}: verified, exposure {m.group(1)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    args = ap.parse_args()
    if os.geteuid() != 0:
        fail("needs root (network and mount namespaces for the install and the sandbox)")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="faas-async-system-"))
    os.chmod(work, 0o711)  # the sandboxed UIDs traverse it to their volumes
    procs: list[Proc] = []
    try:
        print("==> system test: unpack and install with no network", flush=True)
        with tarfile.open(args.bundle) as t:
            t.extractall(work / "unpacked", filter="tar")
        (bundle_dir,) = list((work / "unpacked").iterdir())
        prefix, config, units = work / "prefix", work / "etc", work / "systemd"
        r = subprocess.run(
            ["unshare", "--net", "--", str(bundle_dir / "install.sh"), "--prefix", str(prefix),
             "--config-dir", str(config), "--systemd-dir", str(units)],
            capture_output=True, text=True,
        )
        if r.returncode != 0:
            fail(f"install.sh failed:\n{r.stdout}\n{r.stderr}")
        for b in ("gateway-plugin", "queue-worker", "faas-async", "stats-function", "nats-server"):
            if not os.access(prefix / "bin" / b, os.X_OK):
                fail(f"{b} not installed")
        share = prefix / "share" / "faas-async"
        for need in ("chart/faas-async/Chart.yaml", "rendered/kubernetes/gateway.yaml", "grafana/faas-async.json", "README.md"):
            if not (share / need).is_file():
                fail(f"{need} not installed")
        vendored = (share / "src" / "vendor").is_dir()
        log("installed: " + ("with vendored sources" if vendored else "WITHOUT vendored sources (bundle built with --no-vendor)"))

        print("==> system test: systemd units as installed", flush=True)
        check_units(units, prefix / "bin")

        print("==> system test: the system from the prefix, sandboxed as the image runs it", flush=True)
        env, workdir, user = image_env()
        logs = work / "logs"
        logs.mkdir()
        peer = Peer()
        threading.Thread(target=peer.serve_forever, daemon=True).start()
        functions_toml = '[functions.old]\nmax_age = "1ms"\n'
        worker_settings = {
            "QUEUE_WORKER_GATEWAY_URL": peer.url,
            "QUEUE_WORKER_RETRY_INITIAL_WAIT": "100ms",
            "QUEUE_WORKER_RETRY_MAX_WAIT": "200ms",
            "QUEUE_WORKER_CALLBACK_MAX_ATTEMPTS": "1",
            "QUEUE_WORKER_FUNCTIONS_CONFIG": "/var/lib/faas-async/functions.toml",
            "QUEUE_WORKER_SHUTDOWN_GRACE": "5s",
            "LOG_FORMAT": "text",
        }

        # A state directory on the read-only root must fail: the sandbox really is read-only.
        bad = sandboxed("faas-async-readonly", prefix / "bin" / "faas-async", ARBITRARY_UID, work / "vol-ro",
                        env | {"FAAS_ASYNC_QUEUE_DIR": "/opt/queue", "FAAS_ASYNC_LISTEN": f"127.0.0.1:{free_port()}"},
                        logs, workdir)
        try:
            code = bad.p.wait(30)
        except subprocess.TimeoutExpired:
            bad.stop(5)
            fail("faas-async ran with its queue on the read-only root: the sandbox is not read-only")
        bad.log.close()
        if code == 0 or "Read-only file system" not in bad.tail():
            fail(f"a queue on the read-only root: exit {code}, {bad.tail()[-500:]}")
        log("a queue directory outside the volumes fails: Read-only file system")

        # JetStream: nats-server, gateway-plugin (the image's USER), queue-worker (an arbitrary UID).
        nats_port = free_port()
        nats = Proc("nats-server", [str(prefix / "bin" / "nats-server"), "-a", "127.0.0.1", "-p", str(nats_port),
                                    "-js", "-sd", str(work / "nats")], {"PATH": "/usr/bin:/bin"}, logs)
        procs.append(nats)
        nats_url = f"nats://127.0.0.1:{nats_port}"
        gw_port, wk_port = free_port(), free_port()
        gateway = sandboxed("gateway-plugin", prefix / "bin" / "gateway-plugin", int(user.split(":")[0]), work / "vol-gw",
                            env | {"NATS_URL": nats_url, "GATEWAY_LISTEN": f"127.0.0.1:{gw_port}", "LOG_FORMAT": "text",
                                   "GATEWAY_SHUTDOWN_GRACE": "5s"}, logs, workdir)
        procs.append(gateway)
        (work / "vol-wk" / "state").mkdir(parents=True)
        (work / "vol-wk" / "state" / "functions.toml").write_text(functions_toml)
        worker = sandboxed("queue-worker", prefix / "bin" / "queue-worker", ARBITRARY_UID, work / "vol-wk",
                           env | worker_settings | {"NATS_URL": nats_url, "QUEUE_WORKER_METRICS_LISTEN": f"127.0.0.1:{wk_port}"},
                           logs, workdir)
        procs.append(worker)
        gw = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{gw}/healthz", gateway)
        wait_http(f"{gw}/readyz", gateway)
        wait_http(f"http://127.0.0.1:{wk_port}/healthz", worker)
        for proc, uid in ((gateway, IMAGE_UID), (worker, ARBITRARY_UID)):
            status = Path(f"/proc/{proc.p.pid}/status").read_text()
            want = {"Uid": str(uid), "Gid": "0", "CapEff": "0000000000000000", "NoNewPrivs": "1"}
            for key, value in want.items():
                line = re.search(rf"^{key}:\s+(\S+)", status, re.M)
                if not line or line.group(1) != value:
                    fail(f"{proc.name}: {key} is {line and line.group(1)}, want {value}")
        log(f"gateway-plugin as UID {IMAGE_UID}, queue-worker as UID {ARBITRARY_UID}: group 0, no capabilities, read-only root")
        workload(gw, peer, "JetStream")

        # The all-in-one server on the embedded queue, as an arbitrary UID.
        aio_port = free_port()
        (work / "vol-aio" / "state").mkdir(parents=True)
        (work / "vol-aio" / "state" / "functions.toml").write_text(functions_toml)
        aio = sandboxed("faas-async", prefix / "bin" / "faas-async", ARBITRARY_UID, work / "vol-aio",
                        env | worker_settings | {"FAAS_ASYNC_LISTEN": f"127.0.0.1:{aio_port}"}, logs, workdir)
        procs.append(aio)
        aio_url = f"http://127.0.0.1:{aio_port}"
        wait_http(f"{aio_url}/readyz", aio)
        workload(aio_url, peer, "embedded")
        if not any((work / "vol-aio" / "state" / "queue").iterdir()):
            fail("the embedded queue wrote nothing to its volume")

        print("==> system test: Grafana dashboard and alert rules against a live /metrics", flush=True)
        scraped: set[str] = set()
        for url in (f"{gw}/metrics", f"http://127.0.0.1:{wk_port}/metrics", f"{aio_url}/metrics"):
            st, body = http_get(url)
            if st != 200:
                fail(f"{url} answered {st}")
            scraped |= promql_names.scraped_names(body.decode())
        ours = sorted(n for n in scraped if n.startswith("faas_async_"))
        log(f"scraped {len(ours)} faas_async series names from gateway-plugin, queue-worker and faas-async")
        problems = promql_names.check(scraped)
        if problems:
            fail("the dashboard or the alerts name metrics the binaries do not export:\n  " + "\n  ".join(problems))
        queries = promql_names.dashboard_queries()
        used = set().union(*(promql_names.metric_names(q) for q in queries))
        log(f"dashboard: {len(queries)} queries over {len(used)} metrics, all exported")
        unshown = sorted({re.sub(r"_(bucket|sum|count)$", "", n) for n in ours} - {re.sub(r"_(bucket|sum|count)$", "", n) for n in used})
        if unshown:
            log(f"exported but not on the dashboard: {', '.join(unshown)}")

        print("==> system test: SIGTERM stops everything cleanly", flush=True)
        for proc in reversed(procs):
            code = proc.stop(20)
            if code != 0:
                fail(f"{proc.name} exited with {code} on SIGTERM\n{proc.tail()}")
        procs.clear()
        log(f"all stopped with status 0; system test took {time.monotonic() - started:.0f}s")
        peer.shutdown()
        return 0
    finally:
        for proc in procs:
            if proc.alive():
                proc.p.kill()
                proc.p.wait()
        if os.environ.get("KEEP_SYSTEM_TEST_DIR"):
            print(f"    kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
