#!/usr/bin/env python3
"""Summarizes a bench/run.sh results file (JSON lines): min/median/max per figure and the
ratios imgate : Socket.IO : raw relay taken in the same run.

  python3 bench/summarize.py bench/results/X.jsonl
  python3 bench/summarize.py bench/results/X.jsonl --half-rate imgate   # prints a number
"""
import json
import statistics
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mmm(values):
    values = sorted(values)
    if not values:
        return "n/a"
    return f"{values[0]:g} / {statistics.median(values):g} / {values[-1]:g}"


def med(values):
    return statistics.median(values) if values else float("nan")


def main():
    rows = load(sys.argv[1])
    if len(sys.argv) > 3 and sys.argv[2] == "--half-rate":
        target = sys.argv[3]
        full = [r["msgs_per_s"] for r in rows
                if r["scenario"] == "chat" and r["target"] == target and r.get("rate_cap", 0) == 0]
        print(int(med(full) / 2))
        return
    chat_max = {t: [r for r in rows if r["scenario"] == "chat" and r["target"] == t
                    and r.get("rate_cap", 0) == 0] for t in ("imgate", "socketio", "relay")}
    chat_half = {t: [r for r in rows if r["scenario"] == "chat" and r["target"] == t
                     and r.get("rate_cap", 0) > 0] for t in ("imgate", "socketio")}
    print("\n## chat, maximum load (min / median / max over runs)")
    print("| target | msgs/s | p50 ms | p99 ms | p99.9 ms | max ms | failed | server CPU % (each) | peak RSS MiB (each) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, rs in chat_max.items():
        if not rs:
            continue
        cpu = "; ".join(" ".join(f"{s['cpu_pct']:g}" for s in r["servers"]) for r in rs)
        rss = "; ".join(" ".join(f"{s['peak_rss_mib']:g}" for s in r["servers"]) for r in rs)
        print(f"| {t} | {mmm([r['msgs_per_s'] for r in rs])} | {mmm([r['p50_ms'] for r in rs])} | "
              f"{mmm([r['p99_ms'] for r in rs])} | {mmm([r['p999_ms'] for r in rs])} | "
              f"{mmm([r['max_ms'] for r in rs])} | {sum(r['failed'] for r in rs)} | {cpu} | {rss} |")
    m = {t: med([r["msgs_per_s"] for r in rs]) for t, rs in chat_max.items() if rs}
    if "imgate" in m:
        parts = [f"imgate : socketio = {m['imgate'] / m['socketio']:.2f}" if "socketio" in m else "",
                 f"imgate : relay = {m['imgate'] / m['relay']:.2f}" if "relay" in m else ""]
        print("\nratios of medians: " + ", ".join(p for p in parts if p))
    for t, rs in chat_half.items():
        if rs:
            print(f"\n## chat at {rs[0]['rate_cap']} msgs/s (half of imgate's maximum), {t}")
            print(f"msgs/s {mmm([r['msgs_per_s'] for r in rs])}; p50 {mmm([r['p50_ms'] for r in rs])} ms; "
                  f"p99 {mmm([r['p99_ms'] for r in rs])} ms; p99.9 {mmm([r['p999_ms'] for r in rs])} ms")
    print("\n## idle sessions: server RSS per session (bytes)")
    for r in rows:
        if r["scenario"] == "idle":
            steps = ", ".join(f"{s['sessions']}: {s['bytes_per_session']:g} B ({s['alive']} alive)"
                              for s in r["steps"])
            print(f"- {r['target']}: base {r['base_rss_mib']:.1f} MiB; {steps}")
    logins = [r["logins_per_s"] for r in rows if r["scenario"] == "login"]
    if logins:
        print(f"\n## login: {mmm(logins)} logins/s (min / median / max)")
    fo = [r for r in rows if r["scenario"] == "failover"]
    if fo:
        print(f"\n## failover ({fo[0]['users']} users, kill -9 of the busiest of 3 nodes)")
        print(f"orphans {mmm([r['orphans'] for r in fo])}; re-home p50 {mmm([round(r['rehome_p50_ms']) for r in fo])} ms; "
              f"p99 {mmm([round(r['rehome_p99_ms']) for r in fo])} ms; max {mmm([round(r['rehome_max_ms']) for r in fo])} ms")

    rooms = {t: [r for r in rows if r["scenario"] == "room" and r["target"] == t]
             for t in ("imgate", "socketio")}
    if rooms["imgate"]:
        m = rooms["imgate"][0]["members"]
        print(f"\n## room ({m} members over 3 nodes, {rooms['imgate'][0]['senders']} senders)")
        for t, rs in rooms.items():
            if rs:
                print(f"- {t}: member-acked deliveries/s {mmm([r['member_acked_per_s'] for r in rs])}; "
                      f"latency to the last member p50 {mmm([r['p50_ms'] for r in rs])} ms, "
                      f"p99 {mmm([r['p99_ms'] for r in rs])} ms")
        if rooms["socketio"]:
            a = med([r["member_acked_per_s"] for r in rooms["imgate"]])
            b = med([r["member_acked_per_s"] for r in rooms["socketio"]])
            print(f"- ratio imgate / socketio (medians): {a / b:.2f}x")
    for r in rows:
        if r["scenario"] == "room_memory":
            print(f"\n## room membership memory ({r['entries']} memberships): "
                  f"{r['bytes_per_membership_room_side']} B per (user, room) on the room owner's side, "
                  f"{r['bytes_per_membership_user_side']} B on the user owner's side")


if __name__ == "__main__":
    main()
