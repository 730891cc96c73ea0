"""REPORT.md (tables) and PNG plots (matplotlib) from the result JSONs of one benchmark run.

    python -m benchmarks.report [DIR]      # re-render from DIR/*.json (default benchmarks/results)

Every number in the report is read from a JSON next to it; nothing is computed here beyond
formatting and the ratios' presentation. A benchmark without a JSON shows as "not run".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import BENCHMARKS
from benchmarks.harness import RESULTS_DIR


# ---------------------------------------------------------------------------- formatting
def fs(x: float | None) -> str:
    """Seconds, human-sized."""
    if x is None:
        return "-"
    if x < 0:
        return "-" + fs(-x)
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    if x < 120:
        return f"{x:.2f} s"
    return f"{x / 60:.1f} min"


def fb(n: float | None) -> str:
    """Bytes, human-sized (binary units)."""
    if n is None:
        return "-"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{int(n)} B"


def fx(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}x"


def fpct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def med(d: dict | None) -> float | None:
    return None if not d else d.get("median")


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- sections
def _header(docs: dict[str, dict]) -> list[str]:
    any_doc = next(iter(docs.values()))
    m = any_doc["machine"]
    git = m.get("git") or {}
    tiny = any(d["mode"] == "tiny" for d in docs.values())
    lines = ["# Benchmarks", ""]
    if tiny:
        lines += ["> **Tiny (smoke-test) mode: these numbers are meaningless; run `make bench` for real ones.**", ""]
    lines += [
        f"Generated from the JSON files in this folder (`python -m benchmarks.report`). Machine: **{m['cpu']}**, "
        f"{m['cores']} cores, {fb(m.get('ram_bytes'))} RAM, GPU: **{m.get('gpu') or 'none'}**, torch threads "
        f"{m.get('torch_threads')}. Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ". "
        f"Commit `{(git.get('commit') or 'unknown')[:12]}`" + (" (+ uncommitted changes)" if git.get("dirty") else "")
        + ".",
        "",
        *(["torch ran with 1 thread: the machine was already loaded when the run started, and multi-threaded "
           "torch on oversubscribed cores is far slower (OpenMP threads spin-wait for each other).", ""]
          if m.get("torch_threads") == 1 and (m.get("cores") or 1) > 1 else []),
        "Every figure is the median of several timed runs after warm-up (raw runs are in the JSONs); comparisons "
        "are ratios of figures measured in the same run, on the same machine.",
        "",
    ]
    noisy = {n: d["load_average"] for n, d in docs.items() if d["load_average"].get("noisy")}
    if noisy:
        lines += [
            f"> **Shared, noisy machine.** The 1-minute load average exceeded the core count ({m['cores']}) during: "
            + "; ".join(f"{n} (before {la['before'][0] if la['before'] else '?'}, after "
                        f"{la['after'][0] if la['after'] else '?'})" for n, la in noisy.items())
            + ". Other jobs competed for the CPU: absolute times are inflated and noisier; same-run ratios are "
            "the more trustworthy figures.", "",
        ]
    return lines


def _headline(docs: dict[str, dict]) -> list[str]:
    rows = []
    meth = docs.get("methods", {}).get("results", {})
    r = meth.get("ratios") or {}
    paper = meth.get("paper") or {}
    if r:
        rows.append(["HyperDreamBooth vs DreamBooth, wall time", fx(r.get("speedup_vs_dreambooth")),
                     f"paper {fx(paper.get('speedup_vs_dreambooth'), 0)} faster"])
        rows.append(["HyperDreamBooth vs Textual Inversion, wall time", fx(r.get("speedup_vs_textual_inversion")),
                     f"paper {fx(paper.get('speedup_vs_textual_inversion'), 0)} faster"])
    sz = docs.get("sd15_scale", {}).get("results", {}).get("sizes", {}).get("ratios") or {}
    if sz:
        rows.append(["DreamBooth UNet (fp32) / LiDB file, SD 1.5", fx(sz.get("dreambooth_fp32_over_lidb"), 0),
                     "paper 10,000x smaller"])
        if sz.get("dreambooth_fp32_over_hyperdreambooth_identity_subspace"):
            rows.append(["DreamBooth UNet (fp32) / HyperDreamBooth identity (rank 4 inside the LiDB subspace, "
                         "the default), SD 1.5",
                         fx(sz["dreambooth_fp32_over_hyperdreambooth_identity_subspace"], 0), "paper 10,000x smaller"])
        rows.append(["DreamBooth UNet (fp32) / HyperDreamBooth identity with relax='lora' (LiDB + rank-4 LoRA), "
                     "SD 1.5", fx(sz.get("dreambooth_fp32_over_hyperdreambooth_identity"), 0), "paper 10,000x smaller"])
    st = docs.get("sd15_scale", {}).get("results", {}).get("step_times", {}).get("ratios") or {}
    if st:
        rows.append(["Full-UNet step / LiDB step, SD 1.5 at 256 px", fx(st.get("full_over_lidb"), 2), "-"])
    b = docs.get("batching", {}).get("results", {})
    for size, row in b.items():
        rows.append([f"8 identities batched vs sequential, {size}", fx(row.get("speedup"), 2), "target >= 3x"])
    s1 = docs.get("stage1_batching", {})
    k = f"K={s1.get('settings', {}).get('default_identities_per_call')}"
    if k in s1.get("results", {}):
        rows.append([f"Stage 1, {k} identities per UNet call vs 1 (CPU time)",
                     fx(s1["results"][k]["cpu"]["speedup_vs_K1"], 2), "-"])
    ov = docs.get("service_load", {}).get("results", {}).get("overhead", {})
    for cfg, rpcs in ov.items():
        for rpc, row in rpcs.items():
            rows.append([f"Service overhead, {rpc} ({cfg.replace('_', ' ')})", fpct(row.get("overhead")),
                         "target < +5%"])
    h = docs.get("hypernet_inference", {}).get("results", {})
    for bkey, row in h.items():
        rows.append([f"Hypernetwork onnxruntime vs torch, {bkey}", fx(row.get("onnx_speedup"), 2), "-"])
    g = docs.get("gpu", {}).get("results", {})
    if g:
        rows.append(["GPU", g.get("gpu") if g.get("available") else "not available",
                     "see section 7" if g.get("available") else "no CUDA device in this session"])
    return ["## Headline numbers", "", table(["what", "ours", "reference / target"], rows), ""] if rows else []


def _methods(doc: dict, out: Path) -> list[str]:
    res = doc["results"]
    lines = ["## 1. Personalisation methods (tiny base, same photo, each at its default steps)", ""]
    if "skipped" in res:
        return lines + [f"Skipped: {res['skipped']}", ""]
    rows = []
    for name, r in res["rows"].items():
        h = r.get("heldout_loss") or {}
        rows.append([name, r["steps"], fs(med(r["wall_s"])), fs(med(r.get("step_s"))),
                     fb(r.get("peak_rss_above_base_bytes")), fb(r["artifact_bytes"]),
                     fpct(h.get("drop_same")), fpct(h.get("drop_other")), fpct(h.get("identity_effect"))])
    lines += [table(["method", "steps", "wall time", "time/step", "peak RSS above base", "artifact",
                     "loss drop, same identity", "loss drop, other identities", "identity effect"], rows), ""]
    r, p = res["ratios"], res["paper"]
    lines += [table(["ratio", "ours (tiny base)", "paper"], [
        ["DreamBooth time / HyperDreamBooth time", fx(r["speedup_vs_dreambooth"]), fx(p["speedup_vs_dreambooth"], 0)],
        ["Textual Inversion time / HyperDreamBooth time", fx(r["speedup_vs_textual_inversion"]),
         fx(p["speedup_vs_textual_inversion"], 0)],
        ["LoRA time / HyperDreamBooth time", fx(r["speedup_vs_lora"]), "-"],
        ["LiDB time / HyperDreamBooth time", fx(r["speedup_vs_lidb"]), "-"],
        ["DreamBooth artifact / HyperDreamBooth identity (tiny base)", fx(r["smaller_than_dreambooth"], 0),
         fx(p["smaller_than_dreambooth"], 0) + " (SD scale: section 2)"],
    ]), ""]
    fd = res.get("face_detect_s")
    db = res["rows"].get("dreambooth", {})
    lines += [f"Face detection + crop (MTCNN, once per photo, not in the wall times above): {fs(med(fd))}. "
              f"DreamBooth's class images ({db.get('class_images_seconds') and fs(db['class_images_seconds'])} to "
              "generate, cached) are excluded from its wall time. Loss drops are relative to the base model on the "
              "same noised latents (fixed timesteps and noise); identity effect = same-identity drop - "
              "other-identity drop.", ""]
    if _plot_methods(res, out / "methods.png"):
        lines += ["![methods](methods.png)", ""]
    return lines


def _sd15(doc: dict, out: Path) -> list[str]:
    res = doc["results"]
    sz, st = res["sizes"], res["step_times"]
    lines = ["## 2. SD 1.5 scale (real architecture, random weights, CPU)", "",
             f"UNet parameters: {sz['unet_params']:,}.", ""]
    rows = [[k, f"{v['params']:,}", fb(v["bytes"]), v["how"]] for k, v in sz["artifacts"].items()]
    lines += [table(["artifact", "parameters", "bytes", "how measured"], rows), ""]
    lines += [table(["size ratio", "ours"], [[k.replace("_", " "), fx(v, 0)] for k, v in sz["ratios"].items()]), ""]
    rows = []
    for k in ("full_unet", "lidb", "lora_r4"):
        v = st[k]
        rows.append([k, f"{v['trainable_params']:,}", fs(med(v["step_s"])), v["step_s"]["n"],
                     fb(v.get("peak_rss_above_start_bytes")), v.get("what", "")])
    lines += [f"Time per training step at {st['resolution']} px ({st['unet_params']:,}-parameter UNet, built in "
              f"{fs(st['build_s'])}):", "",
              table(["trainable set", "parameters", "time/step", "timed steps", "peak RSS above start", "note"], rows),
              "", f"Full UNet / LiDB step: {fx(st['ratios']['full_over_lidb'], 2)}; full UNet / LoRA step: "
              f"{fx(st['ratios']['full_over_lora'], 2)}.", ""]
    if _plot_sizes(sz, out / "sd15_sizes.png"):
        lines += ["![sizes](sd15_sizes.png)", ""]
    return lines


def _bases(doc: dict, out: Path) -> list[str]:
    res = doc["results"]
    lines = ["## 2b. Bases beyond SD 1.5 at real shape (meta device)", "",
             "The family's default LiDB (attention projections of every transformer block; for SD3/FLUX also the "
             "joint-attention context projections, and FLUX's single-stream q/k/v) on each real architecture, built "
             "on the meta device. Files are real, written from zero tensors of the real shapes.", ""]
    rows = []
    for name, r in res.items():
        s = r["spec"]
        rows.append([name, f"{r['denoiser_params']:,}", r["layers"], r["narrowest_layer"],
                     f"{s['a']}/{s['b']}/{s['r']}", f"{r['lidb_params']:,}", fb(r["lidb_bytes"]),
                     fb(r["hypernetwork_only_identity"]["bytes"]), fb(r["hyperdreambooth_identity"]["bytes"]),
                     fb(r.get("hyperdreambooth_identity_relax_lora", {}).get("bytes")),
                     fb(r["lora_export_bytes"]), fb(r["lidb_a100_b100"]["bytes"]),
                     fx(r["identity_bytes_over_sd15"], 2)])
    lines += [table(["base", "denoiser params", "layers", "narrowest", "a/b/r", "LiDB params", "LiDB file",
                     "identity (LiDB only)", "identity, fine-tuned (subspace r4, default)",
                     "identity, fine-tuned (relax=lora: + LoRA r4)", "LoRA export (r=1)", "LiDB at a=b=100",
                     "identity vs SD 1.5"], rows), ""]
    kinds = sorted({k for r in res.values() for k in r["layers_by_projection"]})
    rows = [[name] + [r["layers_by_projection"].get(k, 0) for k in kinds] for name, r in res.items()]
    lines += ["Adapted layers per projection:", "", table(["base", *kinds], rows), ""]
    if all("hypernetwork" in r for r in res.values()):
        rows = []
        for name, r in res.items():
            h = r["hypernetwork"]
            shapes = " / ".join("x".join(map(str, v)) for v in h["output_shapes"].values())
            rows.append([name, h["config"], f"{h['layers']} x (r={h['r']}, a={h['a']}, b={h['b']})", shapes,
                         f"{h['outputs_per_identity']:,}", f"{h['params']:,}", f"{h['encoder_params']:,}",
                         f"{h['decoder_params']:,}", f"{h['head_params']:,}", fb(h["fp32_bytes"]),
                         f"{h['forward_tflop']:.2f}", f"{r['denoiser_forward_tflop']:.2f}"])
        lines += ["Hypernetwork per base (meta device): the family's GPU pretraining config, output heads sized from "
                  "the base's default LiDB spec, so it predicts exactly the A_train / B_train a trained LiDB of that "
                  "base saves. Denoiser FLOPs: one forward at the native size (SD 1.5 512 px, others 1024 px), "
                  "what the GPU configs' cost estimates start from.", "",
                  table(["base", "config", "heads: layers x (r, a, b)", "output A / B per identity",
                         "outputs per identity", "hypernetwork params", "encoder", "decoder", "heads", "fp32",
                         "hypernetwork fwd TFLOP", "denoiser fwd TFLOP"], rows), ""]
    lines += gpu_estimates(res)
    return lines


#: Dense bf16 peak of the GPU the estimates are for (H200 SXM) and an assumed utilisation.
_GPU_PEAK_TFLOPS, _GPU_MFU = 989.0, 0.4


def gpu_estimates(res: dict) -> list[str]:
    """Issue 17's GPU figures when no device was lent: FLOPs, seconds and memory from the meta-device counts.

    A 28-step generation is 28 denoiser forwards per image, doubled by classifier-free guidance except
    on FLUX (guidance-distilled); the 40-step fast fine-tune is 40 forward + backward passes (~3 forwards)
    at batch 1. Seconds assume `_GPU_PEAK_TFLOPS` at `_GPU_MFU` utilisation: an estimate, never a timing.
    """
    rows = []
    for name, r in res.items():
        fwd = r.get("denoiser_forward_tflop")
        if fwd is None or name.startswith("sd15"):
            continue
        gen = 28 * (1 if name.startswith("flux") else 2) * fwd
        tune = 40 * 3 * fwd
        rate = _GPU_PEAK_TFLOPS * _GPU_MFU
        rows.append([name, f"{gen:,.0f}", f"{gen / rate:.1f}", f"{tune:,.0f}", f"{tune / rate:.1f}",
                     fb(2 * r["denoiser_params"])])
    if not rows:
        return []
    return ["GPU timings were not measured: no device was lent. Estimates from the FLOP counts above, at the "
            "native size: a 28-step generation is 28 denoiser forwards per image (x2 with classifier-free "
            "guidance; FLUX is guidance-distilled: x1), the 40-step fast fine-tune 40 x (forward + backward, "
            f"~3 forwards) at batch 1. Seconds assume an H200's {_GPU_PEAK_TFLOPS:.0f} dense bf16 TFLOP/s at "
            f"{_GPU_MFU:.0%} utilisation (an assumption, not a measurement); memory is the denoiser's bf16 "
            "weights (text encoders, VAE and activations come on top).", "",
            table(["base", "28-step generation TFLOP", "est. s (H200)", "40-step fine-tune TFLOP", "est. s (H200)",
                   "denoiser bf16"], rows), ""]


def _hypernet(doc: dict, out: Path) -> list[str]:
    res = doc["results"]
    rows = [[k, fs(med(v["torch_s"])), fs(med(v["onnx_s"])), fx(v["onnx_speedup"], 2), f"{v['max_abs_diff']:.1e}"]
            for k, v in res.items()]
    a = doc["settings"]["architecture"]
    lines = ["## 3. Hypernetwork inference (CPU)", "",
             f"{a['encoder']} {a['encoder_kwargs']} at {a['image_size']} px, decoder dim {a['decoder_dim']} x "
             f"{a['decoder_depth']}, {a['iterations']} refinement steps, {a['layers']} layers (a={a['a']}, "
             f"b={a['b']}, r={a['r']}); {doc['settings']['hypernetwork']['label']}.", "",
             table(["batch", "torch", "onnxruntime", "onnx speedup", "max abs diff"], rows), ""]
    if _plot_bars({k: {"torch": med(v["torch_s"]), "onnxruntime": med(v["onnx_s"])} for k, v in res.items()},
                  "seconds per call", "Hypernetwork inference", out / "hypernet_inference.png"):
        lines += ["![hypernet](hypernet_inference.png)", ""]
    return lines


def _service(doc: dict, out: Path) -> list[str]:
    res = doc["results"]
    lines = ["## 4. Service under load (`hdb serve` on loopback, `hdb loadtest` clients)", ""]
    for scenario, points in res.get("sweep", {}).items():
        rows = []
        for users, r in points.items():
            lat = r["latency_s"]
            rows.append([users, fs(r["duration_s"]), r["ok"], r["calls"], f"{r['throughput_rps']:.2f}",
                         fs(lat["p50"]), fs(lat["p95"]),
                         fs(lat["p99"]), r["rejected"], r["failures"],
                         ", ".join(f"{k}: {v}" for k, v in r["status_counts"].items())])
        lines += [f"**{scenario}**", "", table(["users", "measured", "ok", "calls", "ok calls/s", "p50", "p95", "p99",
                                                 "RESOURCE_EXHAUSTED", "failures", "statuses"], rows), ""]
    if res.get("sweep"):
        lines += ["Calls are counted when they start inside the load window; after it, no call starts and the run "
                  "waits for the calls in flight (\"measured\" = window + that drain), so slow calls at high "
                  "concurrency are measured rather than cut off. RESOURCE_EXHAUSTED is the bounded queue pushing "
                  "back (clients wait the server's retry-after-ms hint); any other non-OK status is a failure.", ""]
    for cfg, rpcs in res.get("overhead", {}).items():
        rows = [[rpc, fs(med(r["direct_s"])), fs(med(r["grpc_s"])), fs(r["extra_s"]), fpct(r["overhead"]),
                 _ci(r.get("overhead_ci95")), "yes" if r["meets_target"] else "no"] for rpc, r in rpcs.items()]
        lines += [f"Service overhead ({cfg.replace('_', ' ')}), one call at a time, alternating direct/gRPC "
                  "(overhead and extra: medians over pairs of consecutive calls, which share the machine's load "
                  "at that moment):", "",
                  table(["call", "library direct", "gRPC end-to-end", "extra", "overhead", "95% CI", "< 5%"], rows),
                  ""]
    if _plot_service(res.get("sweep", {}), out / "service_load.png"):
        lines += ["![service](service_load.png)", ""]
    return lines + head_of_line_section(out / "service_load_hol.json")


def _round_spread(runs: list[float], n: int) -> float:
    """Median over rounds of (median latency / max latency) within the round (`n` calls each)."""
    import statistics

    rounds = [runs[i:i + n] for i in range(0, len(runs) - n + 1, n)]
    return statistics.median(statistics.median(r) / max(r) for r in rounds)


def head_of_line_section(path: Path) -> list[str]:
    """PersonalizeAndGenerate p50/p95 under 1/4/8 simultaneous callers, per labelled run
    (`python -m benchmarks.service_load --head-of-line LABEL`), e.g. before/after a fix."""
    if not path.is_file():
        return []
    runs = json.loads(path.read_text()).get("runs", {})
    lines = ["### Head-of-line blocking: PersonalizeAndGenerate under 1/4/8 simultaneous callers", "",
             "Each round releases N calls at once (a barrier) and waits for all; p50/p95 over every call of "
             "every round. The machine is shared and noisy, so compare the ratios *within* a run (to one caller, "
             "and p50/p95), not absolute seconds across runs. Without head-of-line blocking p50 is about half "
             "of p95 (callers finish one after another); with it every caller waits for the last one "
             "(p50 ~ p95).", ""]
    rows = []
    for label, run in runs.items():
        for n, r in run["results"].items():
            rows.append([label, n, fs(r["p50_s"]), fs(r["p95_s"]), fx(r["p50_over_single"], 2),
                         fx(r["p95_over_single"], 2), f"{r['p50_over_p95']:.2f}",
                         f"{_round_spread(r['runs_s'], int(n)):.2f}"])
    lines += [table(["run", "callers", "p50", "p95", "p50 / p50(1)", "p95 / p95(1)", "p50 / p95",
                     "median / last, per round"], rows), "",
              "\"median / last, per round\": in each round, the median caller's latency over the last caller's, "
              "then the median over rounds; a ratio inside one round, so load drift between rounds cancels. "
              "About 1.0 is head-of-line blocking (everyone waits for the last); interleaved it falls towards "
              "(N+1)/(2N).", ""]
    for label, run in runs.items():
        st, la = run["settings"], run["load_average"]
        lines.append(f"- {label}: {run['created']}, {st['rounds']} rounds, {st['personalize_steps']} fine-tune "
                     f"+ {st['gen_steps']} denoising steps, {st['base']}; load average before/after "
                     f"{la['before'][0]:.1f}/{la['after'][0]:.1f} on {run['machine'].get('cores')} cores.")
    return lines + [""]


def _batching(doc: dict, out: Path) -> list[str]:
    res = doc["results"]
    rows = [[k, f"{v['batched_images_per_s']:.2f}", f"{v['sequential_images_per_s']:.2f}", fx(v["speedup"], 2),
             "yes" if v["meets_target"] else "no", v["max_pixel_diff_batched_vs_sequential"]] for k, v in res.items()]
    s = doc["settings"]
    lines = ["## 5. Batching: 8 identities in one call vs one after another", "",
             f"{s['generate_steps']} denoising steps, guidance {s['guidance']}, {s['identities']} identities "
             f"(hypernetwork + {s['identity_finetune_steps']}-step fine-tune each).", "",
             table(["size", "batched images/s", "sequential images/s", "speedup", ">= 3x", "max pixel diff"], rows),
             ""]
    if _plot_bars({k: {"batched": v["batched_images_per_s"], "sequential": v["sequential_images_per_s"]}
                   for k, v in res.items()}, "images / s", "8 identities", out / "batching.png"):
        lines += ["![batching](batching.png)", ""]
    return lines


def _stage1(doc: dict, out: Path) -> list[str]:
    res, s = doc["results"], doc["settings"]
    ks = [k for k in res if k.startswith("K=")]
    rows = [[k, c, fs(res[k][c]["seconds_per_identity_step"]),
             f"{res[k][c]['identities_per_hour_at_production_steps']:,.0f}", fx(res[k][c]["speedup_vs_K1"], 2)]
            for c in ("cpu", "wall") for k in ks]
    return ["## 6. Stage 1: K identities per UNet call", "",
            f"{s['base']}; LiDB a={s['lidb']['a']} b={s['lidb']['b']} r={s['lidb']['r']} on {s['lidb']['layers']} "
            f"layers; batch {s['batch_size_per_identity']} per identity; each variant fits the same "
            f"{s['identities_fitted_per_variant']} identities ({s['timed_steps']} step each), K per call; "
            f"{s['torch_threads']} torch thread(s), one process. Identities/hour are at the production "
            f"{s['production_steps']} steps; `torchrun --nproc-per-node 2` runs two such processes.", "",
            table(["K", "clock", "s per identity-step", "identities / h / process", "speedup vs K=1"], rows), "",
            f"Identity 0 fitted alone vs in a chunk of {max(int(k[2:]) for k in ks)}: max weight difference "
            f"{res['alone_vs_chunk_max_abs_diff']:.2e} (weights up to {res['weights_max_abs']:.2e}).", ""]


def _gpu(doc: dict, out: Path) -> list[str]:
    res = doc["results"]
    lines = ["## 7. GPU", ""]
    if not res.get("available"):
        return lines + [f"**Not measured: {res.get('reason')}.** No GPU figures are reported or estimated.", ""]
    rows = [[k, fs(med(v))] for k, v in res.items() if isinstance(v, dict) and "median" in v]
    return lines + [f"On **{res['gpu']}**:", "", table(["what", "median"], rows), ""]


SECTIONS = {"methods": _methods, "sd15_scale": _sd15, "bases_scale": _bases, "hypernet_inference": _hypernet,
            "service_load": _service, "batching": _batching, "stage1_batching": _stage1, "gpu": _gpu}
ORDER = ("methods", "sd15_scale", "bases_scale", "hypernet_inference", "service_load", "batching", "stage1_batching",
         "gpu")


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_methods(res: dict, path: Path) -> bool:
    rows = {k: v for k, v in res["rows"].items() if med(v.get("wall_s"))}
    if not rows:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(rows)
    axes[0].barh(names, [med(rows[n]["wall_s"]) for n in names], color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("wall time, s (log)")
    axes[1].barh(names, [rows[n]["artifact_bytes"] for n in names], color="tab:orange")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("artifact bytes (log)")
    axes[0].invert_yaxis()
    axes[1].invert_yaxis()
    fig.suptitle("Personalisation methods (tiny base)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_sizes(sz: dict, path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = list(sz["artifacts"])
    ax.barh(names, [sz["artifacts"][n]["bytes"] for n in names], color="tab:green")
    ax.set_xscale("log")
    ax.set_xlabel("bytes (log)")
    ax.invert_yaxis()
    ax.set_title("Artifact size at SD 1.5 scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_bars(groups: dict[str, dict[str, float | None]], ylabel: str, title: str, path: Path) -> bool:
    if not groups:
        return False
    plt = _plt()
    series = list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [v.get(s) or 0 for v in groups.values()], width, label=s)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_service(sweep: dict, path: Path) -> bool:
    if not sweep:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for scenario, points in sweep.items():
        users = [int(u) for u in points]
        axes[0].plot(users, [p["throughput_rps"] for p in points.values()], marker="o", label=scenario)
        for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            axes[1].plot(users, [p["latency_s"][q] or float("nan") for p in points.values()], style, marker="o",
                         label=f"{scenario} {q}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ok calls / s")
    axes[1].set_ylabel("latency, s")
    axes[1].set_yscale("log")
    fig.suptitle("Service under load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- entry
def _notes(docs: dict[str, dict]) -> list[str]:
    lines = ["## Notes and run conditions", ""]
    rows = []
    for name in ORDER:
        d = docs.get(name)
        if d is None:
            continue
        la = d["load_average"]
        rows.append([name, d["mode"], d["created"], fs(d.get("seconds")), la.get("before"), la.get("after"),
                     "yes" if la.get("noisy") else "no"])
    lines += [table(["benchmark", "mode", "finished", "took", "load avg before (1/5/15 min)", "after", "noisy"],
                    rows), ""]
    for name in ORDER:
        for note in (docs.get(name) or {}).get("notes", []):
            lines.append(f"- **{name}**: {note}")
    return lines + ["", "Reproduce: `make bench` (all, CPU, < 30 min on an idle 2-core machine) or "
                    "`.venv/bin/python -m benchmarks --only NAME`; load-test your own deployment with "
                    "`hdb loadtest --target HOST:PORT --users N --duration S [--api-key ...]`.", ""]


def write_report(out_dir: str | Path = RESULTS_DIR) -> Path:
    """Render `out_dir`/REPORT.md (+ PNGs) from the `<name>.json` files there."""
    out = Path(out_dir)
    docs = {}
    for name in BENCHMARKS:
        p = out / f"{name}.json"
        if p.is_file():
            docs[name] = json.loads(p.read_text())
    path = out / "REPORT.md"
    if not docs:
        path.write_text("# Benchmarks\n\nNo results yet: run `make bench`.\n")
        return path
    lines = _header(docs) + _headline(docs)
    for name in ORDER:
        if name in docs:
            lines += SECTIONS[name](docs[name], out)
        else:
            lines += [f"## {name}", "", "Not run.", ""]
    lines += _notes(docs)
    path.write_text("\n".join(lines) + "\n")
    return path


def _ci(ci) -> str:
    """[lo, hi] fractions -> "[-1.2%, +3.4%]"; "-" when the run predates the interval."""
    return f"[{fpct(ci[0])}, {fpct(ci[1])}]" if ci else "-"


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR))
