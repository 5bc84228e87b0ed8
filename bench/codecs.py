#!/usr/bin/env python3
"""gzip codecs side by side on the same 1 MiB chunks of log lines, in one process.

The codecs are the C libraries through their Python bindings (each call compresses a
whole 1 MiB chunk, so the binding's cost per call is noise): the system zlib, zlib-ng
(issue 16 asked for it; flate2 can hold only one backend per build, so it is measured
here), ISA-L's igzip (what the agent and the object sink use) and libdeflate (what the
relay inflates with). zlib-rs, the Rust crate, has no binding: `sluice-gzip-compare`
measures it against the same igzip and libdeflate on chunks built as the agent builds
them (bench/RESULTS.md, "Compression").

    bench/codecs.py [FILE] [MIB]     # default: tail.sh's 100-byte lines, 256 MiB

Needs `pip install zlib-ng isal deflate` (into $SLUICE_CACHE/venv; the script does it
when they are missing). Prints one row per codec: compress MB/s and CPU-s per GB (best of
3), ratio, inflate MB/s with the same library.
"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(os.environ.get("SLUICE_CACHE", os.path.expanduser("~/.cache/sluice")), "venv")

try:
    import deflate
    import isal.isal_zlib as isal_zlib
    import zlib_ng.zlib_ng as zlib_ng
except ImportError:
    if sys.prefix != VENV:
        os.execv(os.path.join(VENV, "bin", "python"), [os.path.join(VENV, "bin", "python")] + sys.argv)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "zlib-ng", "isal", "deflate"])
    os.execv(sys.executable, [sys.executable] + sys.argv)

import zlib  # noqa: E402  (the system's, after the re-exec)

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/bench-tail/lines-100-512-ordered.log")
mib = int(sys.argv[2]) if len(sys.argv) > 2 else 256

chunks = []
with open(path, "rb") as f:
    data = f.read(mib << 20)
at = 0
while at < len(data):
    end = data.rfind(b"\n", at, at + (1 << 20))
    end = len(data) if end <= at else end + 1
    chunks.append(data[at:end])
    at = end
total = sum(len(c) for c in chunks)

GZIP = 31  # wbits for a gzip member
codecs = [
    ("zlib (system %s)" % zlib.ZLIB_RUNTIME_VERSION, 1,
     lambda c: zlib.compress(c, 1, GZIP), lambda g: zlib.decompress(g, GZIP)),
    ("zlib-ng %s" % zlib_ng.ZLIBNG_VERSION, 1,
     lambda c: zlib_ng.compress(c, 1, GZIP), lambda g: zlib_ng.decompress(g, GZIP)),
    ("zlib-ng %s" % zlib_ng.ZLIBNG_VERSION, 2,
     lambda c: zlib_ng.compress(c, 2, GZIP), lambda g: zlib_ng.decompress(g, GZIP)),
    ("ISA-L igzip", 1,
     lambda c: isal_zlib.compress(c, 1, GZIP), lambda g: isal_zlib.decompress(g, GZIP)),
    ("libdeflate", 1,
     lambda c: deflate.gzip_compress(c, 1), lambda g: deflate.gzip_decompress(g)),
]


def best(fn, items):
    times = []
    for _ in range(3):
        t0 = time.process_time()
        out = [fn(x) for x in items]
        times.append(time.process_time() - t0)
    return min(times), out


print(f"{path}: {total / 1e6:.0f} MB in {len(chunks)} chunks of up to 1 MiB\n")
print("| codec | level | compress MB/s | CPU-s per GB | ratio | inflate MB/s |")
print("|---|---|---|---|---|---|")
for name, level, compress, inflate in codecs:
    t, members = best(compress, chunks)
    packed = sum(len(m) for m in members)
    ti, back = best(inflate, members)
    assert back == chunks, f"{name}: inflated bytes differ"
    print(f"| {name} | {level} | {total / t / 1e6:,.0f} | {t / total * 1e9:.2f} | "
          f"{total / packed:.2f} | {total / ti / 1e6:,.0f} |")
