"""`quicknet gpu-train`'s report: what sharing the GPU cost each arm, and results.md from results.json
(the environment, the recipe, one row an arm, each arm's epochs). Pure functions of the results
document: the parent calls them as it writes, the tests with documents of their own."""

from __future__ import annotations

import statistics

from quicknet.build import compile_cache

DATASET = "CIFAR-10 (JPEG-q75 copy), standard 10k test split"
SOLO_IMG_S = {"quicknet": 37981.0}  # 2026-12-04, H200, batch 512, torch.compile, alone on the GPU


def sharing(arms: dict[str, dict]) -> dict[str, dict]:
    """Each arm's median img/s by how many arms were training during the epoch (its own included),
    against the solo estimate. An arm trains from the end of its epoch 1 (compiled) to its end."""
    spans = {}
    for name, arm in arms.items():
        epochs = arm.get("epochs", [])
        if len(epochs) >= 2:
            spans[name] = (epochs[0]["wall_end"], arm.get("train_ended") or epochs[-1]["wall_end"])
    out = {}
    for name, arm in arms.items():
        by_count: dict[int, list[float]] = {}
        for h in arm.get("epochs", [])[1:]:
            mid = h["wall_end"] - h["epoch_seconds"] / 2
            n = sum(1 for a, b in spans.values() if a <= mid <= b)
            by_count.setdefault(max(n, 1), []).append(h["images_per_s"])
        solo = SOLO_IMG_S.get(arm.get("recipe", {}).get("model", ""), SOLO_IMG_S["quicknet"])
        rows = {str(n): round(statistics.median(v), 1) for n, v in sorted(by_count.items())}
        out[name] = {
            "img_s_by_arms_training": rows,
            "solo_estimate_img_s": solo,
            "share_of_solo_by_arms_training": {n: round(v / solo, 3) for n, v in rows.items()},
        }
    return out


def _planned(final: dict) -> str:
    """The epochs planned, and the first plan where the pace since shortened it."""
    planned, first = final.get("planned_epochs"), final.get("first_planned_epochs")
    return f"{planned}, shortened from {first}" if first and planned and first != planned else f"{planned or ''}"


def render_markdown(doc: dict) -> str:
    env = doc.get("environment", {})
    lines = [f"# gpu-train results ({doc.get('started', '')})", ""]
    lines.append(f"- machine: {env.get('gpu') or env.get('cpu')}, driver {env.get('driver')}, {env.get('cpus')} CPUs")
    lines.append(f"- torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, Python {env.get('python')}")
    if "matmul" in doc:
        m = doc["matmul"]
        lines.append(f"- dense {m['dtype']} matmul ceiling: {m['tflops']} TFLOP/s (n={m['n']})")
    if "data" in doc:
        lines.append(f"- data: {doc['data']['source']}, loaded in {doc['data']['seconds']} s")
    lines.append(f"- command: `{doc.get('command', '')}` (budget {doc.get('budget_s')} s)")
    if "recipe" in doc:
        r = doc["recipe"]
        keys = ("batch_size", "lr", "warmup_epochs", "label_smoothing", "ema_decay", "translate", "cutout")
        lines.append("- base recipe: " + ", ".join(f"{k}={r[k]}" for k in keys) + f", eval_every={r['eval_every']}")
    loaded = doc.get("compile_cache_loaded")
    if isinstance(loaded, dict):
        blobs = [a for a in loaded["arms"].values() if isinstance(a, dict)]
        kinds = {k: sum(a.get(k, 0) for a in blobs) for k in ("inductor", "aot_autograd")}
        lines.append(
            f"- warm start: {loaded['file']} loaded in {loaded['seconds']} s "
            f"({kinds['inductor']} Inductor and {kinds['aot_autograd']} AOTAutograd artifacts)"
        )
    elif loaded:
        lines.append(f"- warm start: {loaded}")
    handoff = doc.get("handoff")
    if isinstance(handoff, dict):
        lines.append(
            f"- handed to the serve run: {handoff['arm']} (top-1 {handoff['top1']}), checkpoint "
            f"SHA-256 {handoff['checkpoint_sha256'][:12]}"
        )
    elif handoff:
        lines.append(f"- handed to the serve run: nothing ({handoff})")
    arms = doc.get("arms", {})
    share = doc.get("sharing", {})
    if arms:
        lines += [
            "",
            f"## Arms (EMA weights; top-1 on {DATASET})",
            "",
            "| arm | change | state | epochs (planned) | top-1 | flip TTA | flip+translate TTA | time to 93% "
            "| img/s (median) | img/s (share of solo) with N arms training |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, arm in arms.items():
            f = arm.get("final", {})
            s = share.get(name, {})
            t93 = f.get("time_to", {}).get("93.0%")
            rates = s.get("img_s_by_arms_training", {})
            by_n = "; ".join(f"{n}: {v:,.0f} ({s['share_of_solo_by_arms_training'][n]:.2f})" for n, v in rates.items())
            lines.append(
                f"| {name} | {arm.get('change', '')} | {arm.get('state', '')} "
                f"| {f.get('epochs', len(arm.get('epochs', [])))} ({_planned(f)}) "
                f"| **{f.get('top1', '')}** | {f.get('top1_flip_tta', '')} | {f.get('top1_flip_translate_tta', '')} "
                f"| {'not reached' if f and t93 is None else t93 or ''} | {f.get('images_per_s', '')} "
                f"| {by_n} |"
            )
        lines.append("")
        lines.append(
            "Time to a top-1 counts from the arm's start of training (compile included). Share of solo: "
            f"img/s against {SOLO_IMG_S['quicknet']:,.0f} (quicknet alone, 2026-12-04), keyed by how many arms trained."
        )
    for name, arm in arms.items():
        if arm.get("error"):
            lines += ["", f"**{name} failed:** {arm['error']}"]
        history = arm.get("epochs", [])
        if not history:
            continue
        lines += ["", f"### {name}", ""]
        c = arm.get("compile_counters")
        if c:
            lines += [
                f"torch.compile: {compile_cache.describe(c)} "
                f"(AOTAutograd: {c['aot_autograd_hits']} from the cache, {c['aot_autograd_misses']} traced); "
                f"epoch 1 took {history[0]['epoch_seconds']} s.",
                "",
            ]
        lines += [
            "| epoch | elapsed s | img/s | train loss | train top-1 | test top-1 | EMA top-1 | EMA test loss | LR |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for h in history:
            lines.append(
                f"| {h['epoch']} | {h['elapsed_s']} | {h['images_per_s']:,.0f} | {h['train_loss']} | {h['train_acc']} "
                f"| {h.get('test_acc', '')} | {h.get('test_acc_ema', '')} | {h.get('test_loss_ema', '')} | {h['lr']} |"
            )
    if "error" in doc:
        lines += ["", f"**error:** {doc['error']}"]
    return "\n".join(lines) + "\n"
