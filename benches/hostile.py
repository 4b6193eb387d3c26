#!/usr/bin/env python3
"""Hostile traffic against a running mana-sync, with the replica's memory
and other users' answers measured: the figures of issue 25's findings 3
and 4, before and after.

    benches/hostile.py --url http://127.0.0.1:3050 --pid PID \
        --alice TOKEN --bob TOKEN unread|slow-bodies

`unread`: alice holds 1,000 records of 8 kB; 300 pulls of all of them
(8 MB answers), 20 a second (within PULL_RATE), from clients that never
read. Prints the server's resident memory over 60 s and how many of the
connections it still holds open.

`slow-bodies`: 26 pushes of alice's that together declare exactly the
default BODY_BUDGET (25 of 10 MiB and one of 6 MiB), each sending 2 kB/s;
meanwhile bob pushes once every 2 s for a minute. Prints bob's statuses.

Standard library only; loopback only; it stops by itself.
"""

import argparse
import json
import socket
import time
import urllib.error
import urllib.request


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def push(url, token, body):
    request = urllib.request.Request(
        f"{url}/sync/todo",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def answer_bytes_held(url):
    """The server's `mana_sync_answer_bytes_held`, or None on a build without it."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("mana_sync_answer_bytes_held "):
                return float(line.split()[1]) / 1e6
    return None


def host_port(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def unread(args):
    for batch in range(4):
        changes = [
            {"table": "todos", "id": f"r{batch}-{i}", "op": "insert",
             "data": {"pad": "x" * 8000, "updatedAt": "2026-01-01T00:00:00Z"}}
            for i in range(250)
        ]
        assert push(args.url, args.alice, {"clientId": "a", "changes": changes}) == 200
    print(f"before: {rss_mb(args.pid):.0f} MB resident")
    request = (
        "GET /sync/todo/pull?collection=todos&limit=1000 HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {args.alice}\r\n\r\n"
    ).encode()
    sockets = []
    started = time.monotonic()
    for _ in range(300):
        s = socket.create_connection(host_port(args.url))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(request)
        sockets.append(s)
        time.sleep(0.05)
    peak = 0.0
    heads = [b""] * len(sockets)
    ended = [False] * len(sockets)
    for at in (15, 30, 45, 60):
        while time.monotonic() - started < at:
            peak = max(peak, rss_mb(args.pid))
            time.sleep(0.2)
        for i, s in enumerate(sockets):
            if ended[i]:
                continue
            s.setblocking(False)
            try:
                # Drain what the kernel holds; a connection cut ends in EOF or a reset.
                while True:
                    data = s.recv(1 << 20)
                    if not data:
                        ended[i] = True
                        break
                    if len(heads[i]) < 16:
                        heads[i] += data[:16]
            except BlockingIOError:
                pass
            except OSError:
                ended[i] = True
            s.setblocking(True)
        answered = [i for i, head in enumerate(heads) if head.startswith(b"HTTP/1.1 200")]
        held = sum(1 for i in answered if not ended[i])
        refused = sum(1 for head in heads if head.startswith(b"HTTP/1.1 4") or head.startswith(b"HTTP/1.1 5"))
        print(
            f"{at:>3} s: {rss_mb(args.pid):.0f} MB resident (peak {peak:.0f}), answers held {answer_bytes_held(args.url)} MB; "
            f"{len(answered)} answered 200, {held} of them still held open; {refused} refused (429/503)"
        )
    for s in sockets:
        s.close()


def slow_bodies(args):
    budget = 256 * 1024 * 1024
    sizes = [10 * 1024 * 1024] * 25 + [budget - 25 * 10 * 1024 * 1024]
    slow = []
    for size in sizes:
        head = (
            "POST /sync/todo HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {args.alice}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode()
        s = socket.create_connection(host_port(args.url))
        s.sendall(head + b'{"clientId":"a","changes":[],"pad":"')
        slow.append(s)
    time.sleep(1)  # every head read before bob's first push
    print(f"{len(slow)} slow bodies open: {rss_mb(args.pid):.0f} MB resident")
    statuses = {}
    started = time.monotonic()
    for i in range(30):
        while time.monotonic() - started < i * 2:
            for s in slow:
                try:
                    s.send(b"x" * 400)  # 2 kB/s each at 5 sends a second
                except OSError:
                    pass
            time.sleep(0.2)
        body = {"clientId": "b", "changes": [{"table": "todos", "id": f"b{i}", "op": "insert", "data": {"n": i}}]}
        status = push(args.url, args.bob, body)
        statuses[status] = statuses.get(status, 0) + 1
    print(f"bob's 30 pushes over a minute: {statuses}; {rss_mb(args.pid):.0f} MB resident")
    answers = {}
    for s in slow:
        s.setblocking(False)
        try:
            status = s.recv(16)[9:12].decode() or "closed"
        except BlockingIOError:
            status = "still sending"
        except OSError:
            status = "reset"
        answers[status] = answers.get(status, 0) + 1
        s.close()
    print(f"alice's slow bodies at the end: {answers}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--alice", required=True)
    parser.add_argument("--bob", required=True)
    parser.add_argument("attack", choices=["unread", "slow-bodies"])
    args = parser.parse_args()
    {"unread": unread, "slow-bodies": slow_bodies}[args.attack](args)


if __name__ == "__main__":
    main()
