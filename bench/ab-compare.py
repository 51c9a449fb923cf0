#!/usr/bin/env python3
"""Medians of bench/ab's runs: the datapath cost per packet of BASE ("before")
and this checkout ("after"), by endpoints and rules."""
import re, sys, glob, statistics
def table(path):
    s=open(path).read()
    sec=s.split("## Datapath cost per packet",1)[1]
    rows={}
    for line in sec.splitlines():
        if line.startswith("#### "): break
        m=re.match(r"\| (\d+) \| (\d+) \| [^|]+\| ([^|]+)\| ([^|]+)\| ([^|]+)\|", line)
        if not m: continue
        def med(x):
            x=x.strip()
            return None if x=="—" else float(x.split()[0])
        rows[(int(m[1]),int(m[2]))]=[med(m[3]),med(m[4]),med(m[5])]
    return rows
d=sys.argv[1] if len(sys.argv)>1 else "target/ab/runs"
old=[table(p) for p in sorted(glob.glob(d+"/old-*.md"))]
new=[table(p) for p in sorted(glob.glob(d+"/new-*.md"))]
print(f"runs: old {len(old)}, new {len(new)}")
print("| endpoints | rules | new flow ns before → after | established ns before → after | denied ns before → after | after / before (new / est / denied) |")
print("|---|---|---|---|---|---|")
ratios=[[],[],[]]
for k in sorted(old[0]):
    cells=[];rs=[]
    for i in range(3):
        o=[t[k][i] for t in old if k in t and t[k][i] is not None]
        n=[t[k][i] for t in new if k in t and t[k][i] is not None]
        if not o or not n: cells.append("—"); rs.append("—"); continue
        om,nm=statistics.median(o),statistics.median(n)
        cells.append(f"{om:.0f} → {nm:.0f}")
        r=nm/om; ratios[i].append(r); rs.append(f"{r:.2f}×")
    print(f"| {k[0]} | {k[1]} | {cells[0]} | {cells[1]} | {cells[2]} | {' / '.join(rs)} |")
for name,r in zip(["new flow","established","denied"],ratios):
    print(f"{name}: median ratio {statistics.median(r):.3f}, worst {max(r):.3f}")
