"""`reliability.md` (+ `reliability.json`, `reliability_soak.png`) from the sections' results.

`verdicts(results)` computes the figures the issue asks for - inputs tried and outcomes by
status code, crashes, faults injected and identities lost, soak errors and memory, auth and
isolation cases passed, privacy checks - and whether each meets its bar; the markdown shows
them first, then the detail of every section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Failures the reliability checks found, each fixed in serving/ with a regression test.
FIXES = [
    ("1x100000, 3x3000, 16x16 photos -> INTERNAL (the face detector's image pyramid crashed)",
     "serving/engine.py: photos need a short side >= 32 px and an aspect <= 8:1 -> INVALID_ARGUMENT",
     "tests/reliability/test_corpus.py::test_sliver_and_tiny_photos_are_invalid_argument_not_internal"),
    ("one failing image failed every request batched with it (4 x INTERNAL)",
     "serving/queue/worker.py: a failed batch is retried image by image; only the culprit fails",
     "tests/reliability/test_faults.py::test_worker_exception_fails_only_its_own_request"),
    ("kill -9 mid-write left hidden temp files with partial identity weights forever (local store)",
     "serving/store.py + identities.py: the sweeper deletes temp files older than an hour",
     "tests/reliability/test_faults.py::test_sweep_removes_temp_files_of_interrupted_writes"),
    ("a hung S3 endpoint: 10 stuck GetIdentity calls filled asyncio's default pool; Generate on the "
     "bare base and photo decoding stalled too (DEADLINE_EXCEEDED)",
     "serving/core.py (+ servicer.py, server.py): store I/O on its own 8 threads (`store_call`)",
     "tests/reliability/test_faults.py::test_s3_outage_is_unavailable_and_loses_nothing (phase `hung`)"),
    ("`hdb serve` wrote prompt text to stderr (diffusers' CLIP-truncation warning, own handler)",
     "serving/logs.py: diffusers/transformers logs go through the JSON handler, errors only",
     "tests/reliability/test_privacy.py::test_logs_never_hold_images_keys_or_prompts"),
]


def _get(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per headline figure: value, bar, met."""
    rows = []

    def row(name: str, value: Any, bar: str, met: bool) -> None:
        rows.append({"figure": name, "value": value, "bar": bar, "met": bool(met)})

    fz = res.get("fuzz", {})
    if fz and "error" not in fz:
        t = fz["tally"]
        row("hostile inputs tried", t["tried"], "-", True)
        row("outcomes by status code", ", ".join(f"{k} {v}" for k, v in t["by_code"].items()), "-", True)
        row("crashes (INTERNAL/UNKNOWN/not SERVING)", len(t["crashes"]), "0", not t["crashes"])
        row("imprecise INVALID_ARGUMENT (wrong or no field named)", len(t["imprecise"]), "0", not t["imprecise"])
    fa = res.get("faults", {})
    if fa:
        lost = half = injected = 0
        for key in ("kill9_local", "kill9_s3"):
            k = fa.get(key, {})
            lost += k.get("identities_lost", 0)
            half += k.get("half_written", 0)
            injected += k.get("kills", 0)
        audit = _get(fa, "s3_outage", "audit", default={})
        lost += len(audit.get("lost", []))
        half += len(audit.get("half_written", []))
        injected += len(_get(fa, "s3_outage", "phases", default={})) - 1  # minus the baseline
        injected += 2 * ("worker_exception" in fa) + 2 * ("disconnect" in fa)
        errors = [k for k, v in fa.items() if isinstance(v, dict) and "error" in v]
        row("faults injected", injected, "-", True)
        row("identities lost", lost, "0", lost == 0 and not errors)
        row("half-written identities", half, "0", half == 0 and not errors)
        wx = fa.get("worker_exception", {})
        row("worker fault: bystanders failed", sum(c != "OK" for c in _get(wx, "batch", "bystanders", default=["?"]))
            + (wx.get("bystander_job") != "OK"), "0",
            _get(wx, "batch", "bystanders") == ["OK"] * 3 and wx.get("bystander_job") == "OK")
        dc = fa.get("disconnect", {})
        after = _get(dc, "personalize", "steps_after_notice")
        row("steps run after a disconnect was noticed", after, "<= 2", after is not None and after <= 2)
        if errors:
            row("fault scenarios that errored", ", ".join(errors), "none", False)
    so = res.get("soak", {})
    if so and "error" not in so:
        mem = so.get("memory", {})
        row("soak duration / calls", f"{so['duration_s']:.0f} s / {so['calls']}", "-", True)
        row("soak unexpected errors", so["unexpected_errors"], "0", so["unexpected_errors"] == 0)
        row("soak RSS growth after warm-up", f"{mem.get('growth_mb')} MB (bound {mem.get('bound_mb')} MB total)",
            "within bound", mem.get("within_bound", False))
    elif so:
        row("soak", so["error"], "ran", False)
    se = res.get("security", {})
    if se and "error" not in se:
        groups = se["cases"]["groups"]
        auth = [g for n, g in groups.items() if n.startswith("auth")]
        passed, total = sum(g["passed"] for g in auth), sum(g["total"] for g in auth)
        row("auth cases passed", f"{passed}/{total}", "all", passed == total)
        iso = groups.get("isolation", {"passed": 0, "total": 0})
        row("isolation cases passed", f"{iso['passed']}/{iso['total']}", "all", iso["passed"] == iso["total"] > 0)
        for g in ("tls", "rate_limit"):
            x = groups.get(g, {"passed": 0, "total": 0})
            row(f"{g} cases passed", f"{x['passed']}/{x['total']}", "all", x["passed"] == x["total"] > 0)
        leaks = [k for k, v in se.get("timing", {}).items() if v.get("leak_suspected")]
        row("auth timing leak suspected", ", ".join(leaks) or "no", "no", not leaks)
    elif se:
        row("security", se["error"], "ran", False)
    pr = res.get("privacy", {})
    if pr:
        disk = pr.get("photos_never_touch_disk", {})
        row("photo bytes found on disk", len(disk.get("photo_found_in", ["?"])), "0",
            "error" not in disk and not disk.get("photo_found_in"))
        dl = pr.get("delete_leaves_no_trace", {})
        traces = sum(len(_get(dl, k, "traces_after", default=["?"])) for k in ("local", "s3"))
        row("traces after DeleteIdentity (local + S3)", traces, "0", "error" not in dl and traces == 0)
        tt = pr.get("ttl_expiry_deletes", {})
        row("TTL expiry deleted (local, S3)", ", ".join(_get(tt, k, "get_after", default="?") for k in ("local", "s3")),
            "NOT_FOUND, NOT_FOUND", all(_get(tt, k, "get_after") == "NOT_FOUND" for k in ("local", "s3")))
        lg = pr.get("logs_clean", {})
        found = [k for k in ("api_keys_found", "bearer_found", "prompt_found", "photo_found") if lg.get(k)]
        row("secrets in logs (keys, prompts, photo bytes)", ", ".join(found) or "none", "none",
            "error" not in lg and not found)
    return rows


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def plot_soak(soak: dict[str, Any], path: Path) -> bool:
    curve = soak.get("rss_curve") or []
    if len(curve) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot([t for t, _ in curve], [r / 2**20 for _, r in curve], color="tab:blue")
    mem = soak.get("memory", {})
    if mem.get("bound_mb"):
        a.axhline(mem["bound_mb"], color="tab:red", ls="--", label=f"bound {mem['bound_mb']} MB")
        a.legend(loc="lower right")
    a.set_ylabel("server RSS (MB)")
    a.set_title(f"soak: {soak['calls']} calls, {soak['unexpected_errors']} unexpected errors")
    wins = soak.get("windows", [])
    for key, style in (("generate_p50_s", "-o"), ("generate_p95_s", "-s")):
        pts = [(w["t0_s"], w[key]) for w in wins if w.get(key) is not None]
        b.plot([t for t, _ in pts], [v for _, v in pts], style, label=key.replace("generate_", "Generate "))
    b.set_xlabel("seconds since the load started")
    b.set_ylabel("latency (s)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(res: dict[str, Any], out_dir: Path) -> Path:
    """Write reliability.json, reliability.md and the soak PNG into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    res["verdicts"] = verdicts(res)
    (out_dir / "reliability.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    png = plot_soak(res.get("soak", {}), out_dir / "reliability_soak.png")
    meta = res.get("meta", {})
    md = [f"# Reliability and security report ({meta.get('mode', '?')} mode)", "",
          f"Generated by `python -m benchmarks.reliability{' --short' if meta.get('mode') == 'short' else ''}` "
          f"on {meta.get('machine', '?')} at {meta.get('started', '?')} (commit {meta.get('commit', '?')}); "
          f"took {meta.get('seconds', 0):.0f} s. Machine load (1-min average) at start "
          f"{meta.get('load_start', '?')}, at end {meta.get('load_end', '?')}: timings are noisy.", "",
          "## Headline figures", "",
          _table(["figure", "value", "bar", "met"],
                 [[r["figure"], r["value"], r["bar"], "yes" if r["met"] else "**NO**"] for r in res["verdicts"]]),
          "", "## Failures found and fixed (each with a regression test)", "",
          _table(["failure", "fix", "regression test"], [list(f) for f in FIXES]), ""]
    md += _fuzz_md(res.get("fuzz", {})) + _faults_md(res.get("faults", {}))
    md += _soak_md(res.get("soak", {}), png) + _security_md(res.get("security", {}))
    md += _privacy_md(res.get("privacy", {}))
    path = out_dir / "reliability.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _fuzz_md(fz: dict[str, Any]) -> list[str]:
    if not fz:
        return []
    if "error" in fz:
        return ["## 1. Hostile inputs", "", f"Errored: {fz['error']}", ""]
    t = fz["tally"]
    codes = sorted({c for kind in t["by_kind"].values() for c in kind})
    md = ["## 1. Hostile inputs", "",
          f"{t['tried']} inputs: the {len(fz['corpus']['cases'])}-file corpus (tests/reliability/corpus/, "
          "generated by benchmarks/reliability/corpus.py), the named edge cases, and hypothesis "
          f"({fz['max_examples']} examples per RPC group; one hostile field per request, whose name the "
          "INVALID_ARGUMENT message must contain). Server limits for the fuzz run: "
          f"`{fz['limits']}`.", "", "Outcomes by input kind and status code:", "",
          _table(["kind", *codes], [[k, *(v.get(c, 0) for c in codes)] for k, v in t["by_kind"].items()]), ""]
    c = fz["corpus"]
    md += [f"Corpus: server RSS {c['rss_start'] / 2**20:.0f} MB before, peak {c['rss_peak'] / 2**20:.0f} MB, "
           f"after {c['rss_end'] / 2**20:.0f} MB (the in-process server and this harness).", "",
           _table(["case", "bytes", "status", "allowed", "ok"],
                  [[r["name"], r["bytes"], r["code"], "/".join(r["expect"]), "yes" if r["ok"] else "**NO**"]
                   for r in c["cases"]]), ""]
    md += ["Edge cases:", "", _table(["case", "status", "ok"],
                                     [[r["name"], r["code"], "yes" if r["ok"] else "**NO**"] for r in fz["edge"]]), ""]
    if t["crashes"] or t["imprecise"]:
        md += ["Crashes / imprecise answers:", "", "```", json.dumps(t["crashes"] + t["imprecise"], indent=1)[:4000],
               "```", ""]
    return md


def _faults_md(fa: dict[str, Any]) -> list[str]:
    if not fa:
        return []
    md = ["## 2. Faults", ""]
    s3 = fa.get("s3_outage", {})
    if "phases" in s3:
        md += ["S3 (moto behind a TCP fault proxy) while the server runs:", "",
               _table(["phase", "outcomes"], [[k, ", ".join(f"{a}={b}" for a, b in v.items())]
                                              for k, v in s3["phases"].items()]), "",
               f"Store audit after the outage: `{s3['audit']}` ({s3['acked']} identities acknowledged).", ""]
    elif s3:
        md += [f"S3 outage errored: {s3.get('error')}", ""]
    rows = []
    for key in ("kill9_local", "kill9_s3"):
        k = fa.get(key, {})
        if "error" in k:
            rows.append([key, k["error"], "", "", "", "", ""])
        elif k:
            rows.append([k["store"], k["kills"], k["acked"], k["identities_lost"], k["half_written"],
                         f"{k['orphan_blobs_max']} / {k['temp_files_max']}",
                         f"{k['left_after_sweep']['orphan_blobs']} / {k['left_after_sweep']['temp_files']}"])
    if rows:
        md += ["kill -9 of `hdb serve` while 3 clients write identities (then restart and use every identity):", "",
               _table(["store", "kills", "acknowledged", "lost", "half-written",
                       "orphan blobs / temp files after kill", "after the sweeper"], rows), ""]
    for key in ("worker_exception", "disconnect"):
        if fa.get(key):
            md += [f"{key}:", "", "```", json.dumps(fa[key], indent=1), "```", ""]
    return md


def _soak_md(so: dict[str, Any], png: bool) -> list[str]:
    if not so:
        return []
    if "error" in so:
        return ["## 3. Soak", "", f"Errored: {so['error']}", ""]
    mem = so["memory"]
    lat = so["generate_latency_s"]
    md = ["## 3. Soak", "",
          f"{so['users']} locust users (two tenants, a weighted mix of every RPC incl. deliberate bad "
          f"prompts and keys) for {so['duration_s']:.0f} s against `hdb serve` "
          f"({'in-process' if so['in_process'] else 'subprocess'}; identity TTL {so.get('ttl_s')} s, swept while "
          "the load runs; each user renews its identity before it expires): "
          f"{so['calls']} calls, **{so['unexpected_errors']} unexpected errors**, {so['backpressure']} "
          "RESOURCE_EXHAUSTED (back-pressure, honoured).", "",
          f"Memory: RSS {mem.get('rss_after_warmup_mb')} MB after warm-up -> {mem.get('rss_end_mb')} MB at the end "
          f"(peak {mem.get('rss_peak_mb')} MB); bound: +10% + 64 MB = {mem.get('bound_mb')} MB -> "
          f"{'within' if mem.get('within_bound') else '**EXCEEDED**'}.", "",
          f"Generate latency over the run: p50 {_num(lat['p50'])}, p95 {_num(lat['p95'])}, p99 {_num(lat['p99'])} s; "
          f"p95 last window / first window = {_num(so.get('p95_last_over_first_window'))}.", ""]
    if png:
        md += ["![soak](reliability_soak.png)", ""]
    md += [_table(["window start (s)", "calls", "Generate p50 (s)", "p95 (s)", "p99 (s)"],
                  [[w["t0_s"], w["calls"], *(None if w[k] is None else round(w[k], 3)
                                             for k in ("generate_p50_s", "generate_p95_s", "generate_p99_s"))]
                   for w in so["windows"]]), "",
           _table(["task", "status counts"], [[k, ", ".join(f"{c} {n}" for c, n in v.items())]
                                              for k, v in sorted(so["by_task"].items())]), ""]
    return md


def _security_md(se: dict[str, Any]) -> list[str]:
    if not se:
        return []
    if "error" in se:
        return ["## 4. Security", "", f"Errored: {se['error']}", ""]
    md = ["## 4. Security", "", _table(["group", "passed", "total"],
                                       [[g, v["passed"], v["total"]] for g, v in se["cases"]["groups"].items()]), "",
          _table(["group", "case", "expected", "got", "passed"],
                 [[r["group"], r["case"], r["expect"], r["got"], "yes" if r["passed"] else "**NO**"]
                  for r in se["cases"]["rows"]]), "",
          "Auth timing (keys equal to a real key but for the last character vs random keys of the same length; "
          "interleaved at random). A leak needs p < 0.001 *and* a median difference > 5%:", "",
          _table(["path", "n each", "median valid-prefix (us)", "median random (us)", "diff", "Mann-Whitney p",
                  "KS p", "leak suspected"],
                 [[k, v["n_each"], v["median_us_valid_prefix"], v["median_us_random"], f"{v['median_diff_pct']}%",
                   f"{v['mannwhitney_p']:.3g}", f"{v['ks_p']:.3g}", v["leak_suspected"]]
                  for k, v in se.get("timing", {}).items()]), "",
          f"Rate limit (2 req/s, burst 4): {se.get('rate_limit')}", ""]
    return md


def _privacy_md(pr: dict[str, Any]) -> list[str]:
    if not pr:
        return []
    md = ["## 5. Privacy", ""]
    for key, val in pr.items():
        md += [f"{key}:", "", "```", json.dumps(val, indent=1, default=str)[:3000], "```", ""]
    return md


def _num(x, digits: int = 3) -> str:
    """A float for the report (0.28207500000000013 -> 0.282); anything else as it is."""
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
