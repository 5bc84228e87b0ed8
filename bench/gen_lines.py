"""Synthetic nginx combined-format lines of exactly LINE_BYTES bytes (newline included),
varied in every field, each with a unique request id, so neither gzip nor the reader sees
repeated padding (they gzip about 3x). Prints the number of lines written.

    python3 bench/gen_lines.py LINE_BYTES SIZE_MB PATH [TIMES]

TIMES is how the `[time]` fields go: `ordered` (the default) as a server writes them, the
clock advancing one second every LINES_PER_SECOND (2,000) lines from 2026-11-23 05:00:00;
`random`: any second of November, so no two neighbouring lines share one (the worst case
for a parser's time cache).
"""
import datetime, random, sys
line_bytes, size_mb, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
times = sys.argv[4] if len(sys.argv) > 4 else "ordered"
if times not in ("ordered", "random"):
    sys.exit(f"TIMES must be ordered or random, not {times!r}")
LINES_PER_SECOND = 2_000
start = datetime.datetime(2026, 11, 23, 5, 0, 0)
rnd = random.Random(42)
methods = ["GET"] * 8 + ["POST"] * 3 + ["PUT", "DELETE", "HEAD", "PATCH"]
paths = ["/", "/index.html", "/api/v1/items", "/api/v1/items/{n}", "/api/v2/users/{n}/orders",
         "/static/js/app.{h}.js", "/static/css/site.{h}.css", "/login", "/logout", "/search",
         "/healthz", "/metrics", "/img/{h}.png", "/cart/{n}/checkout", "/feed.xml"]
codes = [200] * 20 + [201, 204, 301, 302, 304, 304, 400, 401, 403, 404, 404, 429, 500, 502, 503]
agents = ["Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
          "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
          "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
          "curl/8.5.0", "Go-http-client/1.1", "python-requests/2.31.0", "kube-probe/1.29",
          "Googlebot/2.1 (+http://www.google.com/bot.html)"]
referers = ["-", "https://www.example.com/", "https://shop.example.com/cart", "https://www.google.com/",
            "https://news.ycombinator.com/item?id={n}"]
words = ("alpha beta gamma delta region zone user session cart order item page sort filter "
         "limit offset lang theme promo ref utm_source utm_medium campaign token").split()
alnum = "abcdefghijklmnopqrstuvwxyz0123456789"

def pool_line():
    n = rnd.randrange(1, 10_000_000)
    h = "".join(rnd.choice("0123456789abcdef") for _ in range(8))
    ip = f"{rnd.randrange(1, 224)}.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
    user = "-" if rnd.random() < 0.9 else rnd.choice(["alice", "bob", "carol", "svc-batch"])
    ts = f"{rnd.randrange(1, 29):02d}/Nov/2026:{rnd.randrange(24):02d}:{rnd.randrange(60):02d}:{rnd.randrange(60):02d} +0000"
    path = rnd.choice(paths).format(n=n, h=h)
    query = "&".join(f"{rnd.choice(words)}={''.join(rnd.choice(alnum) for _ in range(rnd.randrange(2, 12)))}"
                     for _ in range(rnd.randrange(0, 40)))
    size = rnd.randrange(0, 200_000)
    return (ip, user, ts, rnd.choice(methods), path, query, rnd.choice(codes), size,
            rnd.choice(referers).format(n=n), rnd.choice(agents))

pool = [pool_line() for _ in range(20_000)]
target = size_mb * 1024 * 1024
width = line_bytes - 1  # without the newline
written, rid = 0, 0
with open(path, "w", buffering=1 << 20) as f:
    batch = []
    while written < target:
        ip, user, ts, method, p, query, code, size, ref, agent = pool[rid % len(pool)]
        if times == "ordered":
            if rid % LINES_PER_SECOND == 0:
                now = start + datetime.timedelta(seconds=rid // LINES_PER_SECOND)
                ordered_ts = now.strftime("%d/%b/%Y:%H:%M:%S +0000")
            ts = ordered_ts
        head = f'{ip} - {user} [{ts}] "{method} '
        rest = f' HTTP/1.1" {code} {size}'
        rid_s = f" rid={rid:010x}"
        extra = f' "{ref}" "{agent}"'
        room = width - len(head) - len(rest) - len(rid_s)
        p = p[: max(1, room)]  # 100-byte lines get shorter paths
        room -= len(p)
        if room >= len(extra):
            room -= len(extra)
        else:
            extra = ""
        q = ""
        if room > 1:
            # The query string fills the line: parameters of other pool entries, so
            # every line differs and nothing is a repeated pad.
            more = (pool[(rid * k + 7) % len(pool)][5] for k in (1, 3, 5, 7, 11, 13, 17))
            q = ("?" + "&".join(filter(None, (query, *more))))[:room]
        line = (head + p + q + rest + extra + rid_s)[:width]
        line += "".join(alnum[(rid + i) % 36] for i in range(width - len(line)))
        batch.append(line)
        written += line_bytes
        rid += 1
        if len(batch) >= 10_000:
            f.write("\n".join(batch) + "\n")
            batch.clear()
    if batch:
        f.write("\n".join(batch) + "\n")
print(rid)
