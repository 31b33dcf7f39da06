#!/usr/bin/env python3
"""Sums callgrind's self instruction counts by component (crypto, TLS, HTTP/2, ...).

    callgrind_annotate --threshold=100 callgrind.out.N | scripts/callgrind-categories.py CERTS

CERTS is the number of certificates the dump covers; prints instructions per certificate
for each component. Rows at >= 99% are thread-entry frames that were on the stack when the
counters were zeroed (callgrind charges them the whole run) and are skipped.
"""
import re
import sys

RULES = [
    ("crypto (ring: P-256, RSA, SHA-2, AES-GCM)", r"/ring-"),
    ("allocator (malloc/free)", r"malloc|mimalloc|libmimalloc|memalign"),
    ("memcpy/memmove/memset", r"memcpy|memmove|memset|memcmp|strlen"),
    ("TLS records (rustls)", r"/rustls-"),
    ("HTTP/2 (h2, hyper, HPACK)", r"/h2-|/hyper-|/hyper-util-"),
    ("gRPC + protobuf (tonic, prost)", r"/tonic-|/prost-|/tower-"),
    ("tokio (scheduler, I/O, timers)", r"/tokio-|/mio-"),
    ("X.509/ASN.1 (x509-parser, der, rcgen, yasna)", r"/x509-parser-|/der-parser-|/asn1-rs-|/rcgen-|/yasna-|/der-|/nom-|/pem-|/base64-"),
    ("logging (tracing)", r"/tracing-"),
    ("JSON (serde_json)", r"/serde_json-"),
    ("citadel", r"/src/(ca|server|auth|pki|store|identity|clock|audit|journal)/|wt-[a-z]+/src|/work/"),
    ("Rust std/core/alloc", r"/rustc/"),
    ("libc (other)", r"libc\.so|ld-linux"),
]


def main():
    certs = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    totals = {name: 0 for name, _ in RULES}
    totals["other"] = 0
    program = None
    row = re.compile(r"^\s*([\d,]+) \(\s*([\d.]+)%\)\s+(.*)$")
    in_table = False
    for line in sys.stdin:
        # Only the function table: the annotated source listings after it repeat the counts.
        if "file:function" in line:
            in_table = True
            continue
        if in_table and line.startswith("-----") and program is not None and any(totals.values()):
            break
        if line.lstrip().endswith("PROGRAM TOTALS\n") or "PROGRAM TOTALS" in line:
            m = row.match(line)
            if m:
                program = int(m.group(1).replace(",", ""))
            continue
        if not in_table:
            continue
        m = row.match(line)
        if not m:
            continue
        ir, pct, where = int(m.group(1).replace(",", "")), float(m.group(2)), m.group(3)
        if pct >= 99.0:
            continue
        for name, pat in RULES:
            if re.search(pat, where):
                totals[name] += ir
                break
        else:
            totals["other"] += ir
    if program:
        print(f"{'component':<48} {'instr/cert':>12} {'share':>7}")
        for name, ir in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"{name:<48} {ir // certs:>12,} {100.0 * ir / program:>6.1f}%")
        print(f"{'total':<48} {program // certs:>12,}")


if __name__ == "__main__":
    main()
