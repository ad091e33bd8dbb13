#!/usr/bin/env python3
"""Benchmark: smtprelay beside nginx's mail proxy and a direct connection.

Everything runs on loopback, on free ports, and stops by itself:
Postfix's smtp-sink is the back-end (it discards mail), Postfix's
smtp-source is the client, and the same workloads go

  direct          smtp-source -> smtp-sink
  smtprelay       smtp-source -> smtprelay --backend -> smtp-sink
  smtprelay+auth  smtp-source -> smtprelay --auth-http (nginx http block) -> smtp-sink
  nginx           smtp-source -> nginx mail proxy (auth_http, same block) -> smtp-sink

For each it prints messages per second, MB per second and the proxy's peak
resident memory (VmHWM; for nginx, master and worker added up).

    apt-get install postfix nginx-light libnginx-mod-mail   # smtp-sink, smtp-source, nginx
    python3 contrib/benchmark.py [--quick]

Both proxies run one process (nginx: worker_processes 1; smtprelay:
threads under one interpreter) on a 2-core machine. Figures vary from run
to run by some percent; compare columns of one run.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RELAY = HERE.parent / "smtprelay.py"
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"

# (name, smtp-source arguments, messages, bytes per message)
WORKLOADS = [
    ("20 sessions x 1 KB, new connection per message", ["-s", "20", "-l", "1000"], 4000, 1000),
    ("1 session, 1 KB messages on one connection", ["-s", "1", "-d", "-l", "1000"], 2000, 1000),
    ("4 sessions x 10 MB", ["-s", "4", "-l", "10000000"], 40, 10_000_000),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_accepting(port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"{proc.args[0]} did not listen on {port} within {timeout}s")


def peak_rss_kb(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid):
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Processes:
    """Started processes, all stopped at exit."""

    def __init__(self):
        self.procs = []

    def start(self, argv, **kwargs):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=kwargs.pop("stderr", subprocess.DEVNULL), **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def nginx_config(tmp, mail_port, http_port, sink_port):
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    (tmp / "nginx").mkdir()
    return f"""
load_module {MAIL_MODULE};
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx/nginx.pid;
error_log {tmp}/nginx/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx/body; proxy_temp_path {tmp}/nginx/proxy;
    fastcgi_temp_path {tmp}/nginx/fastcgi; uwsgi_temp_path {tmp}/nginx/uwsgi; scgi_temp_path {tmp}/nginx/scgi;
    server {{
        listen 127.0.0.1:{http_port};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port {sink_port};
            return 204;
        }}
    }}
}}
mail {{
    server_name bench.example;
    auth_http 127.0.0.1:{http_port}/auth;
    xclient on;
    server {{
        listen 127.0.0.1:{mail_port};
        protocol smtp;
        smtp_auth none;
    }}
}}
"""


def run_workload(port, args, messages, timeout):
    """smtp-source against port -> seconds taken; fails loudly on any SMTP error."""
    argv = ["smtp-source", "-m", str(messages), "-f", "bench@example.org", "-t", "sink@example.net",
            "-M", "client.example", *args, f"127.0.0.1:{port}"]
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - start
    if result.returncode != 0 or result.stderr.strip():
        raise SystemExit(f"smtp-source failed against port {port}: {result.stderr.strip() or result.returncode}")
    return elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tenth of the messages, for a smoke run")
    args = p.parse_args(argv)
    for tool in ("smtp-sink", "smtp-source"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install postfix")
    with_nginx = shutil.which("nginx") and os.path.exists(MAIL_MODULE)
    processes = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="smtprelay-bench-") as tmp:
            tmp = Path(tmp)
            sink_port = free_port()
            sink = processes.start(["smtp-sink", *(["-u", "nobody"] if os.geteuid() == 0 else []),
                                    f"127.0.0.1:{sink_port}", "1024"])
            wait_accepting(sink_port, sink)
            targets = {"direct": (sink_port, [])}

            relay_port = free_port()
            relay = processes.start([sys.executable, str(RELAY), "-c", "/dev/null", "--listen",
                                     f"127.0.0.1:{relay_port}", "--backend", f"127.0.0.1:{sink_port}",
                                     "--log-level", "warning"])
            wait_accepting(relay_port, relay)
            targets["smtprelay"] = (relay_port, [relay.pid])

            if with_nginx:
                mail_port, http_port = free_port(), free_port()
                conf = tmp / "nginx.conf"
                conf.write_text(nginx_config(tmp, mail_port, http_port, sink_port))
                nginx = processes.start(["nginx", "-p", str(tmp / "nginx"), "-c", str(conf)])
                wait_accepting(mail_port, nginx)
                wait_accepting(http_port, nginx)
                auth_port = free_port()
                relay_auth = processes.start([sys.executable, str(RELAY), "-c", "/dev/null", "--listen",
                                              f"127.0.0.1:{auth_port}", "--auth-http",
                                              f"http://127.0.0.1:{http_port}/auth", "--log-level", "warning"])
                wait_accepting(auth_port, relay_auth)
                targets["smtprelay+auth"] = (auth_port, [relay_auth.pid])
                targets["nginx"] = (mail_port, [nginx.pid])
            else:
                print("nginx or its mail module missing (apt-get install nginx-light libnginx-mod-mail):"
                      " nginx columns left out\n")

            print(f"{'workload':48} {'target':15} {'msg/s':>9} {'MB/s':>8} {'peak RSS':>10}")
            for name, workload_args, messages, size in WORKLOADS:
                messages = max(4, messages // 10) if args.quick else messages
                for target, (port, pids) in targets.items():
                    seconds = run_workload(port, workload_args, messages, timeout=600)
                    rss = peak_rss_kb([*pids, *[c for pid in pids for c in children(pid)]])
                    print(f"{name:48} {target:15} {messages / seconds:9.0f} "
                          f"{messages * size / seconds / 1e6:8.1f} {f'{rss / 1024:.1f} MB' if pids else '-':>10}",
                          flush=True)
                print()
    finally:
        processes.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
