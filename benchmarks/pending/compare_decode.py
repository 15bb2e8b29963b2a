"""Verdict on a decode-kernel candidate from one `gemm_timing decode` log in
which run_m16x2.sh ran the landed kernel ("### base") and the candidate
("### cand") twice each: per cell the faster of a binary's runs, the ratio
candidate / base, and, last line, "cand" only if kernel_test passed (its
exit status, second argument) and the M = 16 cells at N = 11008 and 28672
(the ones the candidate targets) total under 0.98x the base.

    python3 compare_decode.py LOG KERNEL_TEST_RC
"""
import re
import statistics
import sys

path, kt = sys.argv[1], int(sys.argv[2])
times = {}
who = None
for line in open(path):
    if line.startswith("### "):
        who = line.split()[1]
        continue
    m = re.match(r"M=\s*(\d+) N=\s*(\d+) K=\s*(\d+) G=\s*(\d+)\s+decode (\S+)\s+([\d.]+) us", line)
    if m and who:
        key = (int(m[1]), int(m[2]), int(m[3]), m[5])
        times.setdefault(who, {}).setdefault(key, []).append(float(m[6]))
base, cand = times.get("base", {}), times.get("cand", {})
ratios, target_b, target_c = [], 0.0, 0.0
for key in sorted(base):
    if key not in cand:
        continue
    b, c = min(base[key]), min(cand[key])
    ratios.append(c / b)
    print(f"M={key[0]:3d} N={key[1]:6d} K={key[2]:6d} {key[3]:5s} base {b:7.1f} cand {c:7.1f} us  {c / b:.3f}x")
    if key[0] == 16 and key[1] in (11008, 28672):
        target_b += b
        target_c += c
ok = kt == 0 and target_b > 0 and target_c < 0.98 * target_b
if ratios:
    print(f"cells {len(ratios)}: median {statistics.median(ratios):.3f}x, range {min(ratios):.3f}-{max(ratios):.3f}x; "
          f"M=16 wide-N cells {target_c:.1f} / {target_b:.1f} us = {target_c / max(target_b, 1e-9):.3f}x; kernel_test rc {kt}")
print("cand" if ok else "base")
