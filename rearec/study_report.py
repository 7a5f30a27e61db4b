"""The study v2 report: ``docs/results.md``, ``results.json`` and plots, computed from the committed
per-run result files alone (see :mod:`rearec.study`), so that ``rearec study`` regenerates them
exactly. Nothing here trains or loads a model.

Per dataset: the tuning grid; the headline table (mean ± std over seeds, gains over base with 95%
user-clustered hierarchical bootstrap intervals and Holm-adjusted p-values, a user-averaged row);
metrics per reasoning step with three oracles (step, seed, MC-dropout); adaptive-depth selectors
fitted on validation and scored on test; the PRL diagnosis; the bf16 twins (the check of the mixed
precision some datasets train in); every run's best epoch; a closing comparison with the paper's claims.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import numpy as np

from rearec.runs import atomic_write, read_json, write_json, write_text
from rearec.selectors import StepData, evaluate_selectors, ndcg
from rearec.stats import gain_summary, holm, user_averaged
from rearec.study import (BACKBONE_ARMS, CONFIRMATIONS, DATASETS, DIAGNOSES, TUNED_AS, Protocol, base_arm, compute_plan,
                          grid_choice, protocol_of, read_results, reported_arms, twin_of)

ROUNDS = 2000  # bootstrap replicates
REASONING_ARMS = ("erl", "prl", "prl-k1", "prl-k3") + tuple(CONFIRMATIONS)
#: Arms whose steps the adaptive-depth selectors choose among: every reasoning arm, BERT4Rec's too.
SELECTOR_ARMS = REASONING_ARMS + tuple(a for a in BACKBONE_ARMS if a != "bert4rec-base")
#: The selectors that choose a depth per user (the target's candidates), as against the fixed step,
#: the readout and the random placebo.
ADAPTIVE_SELECTORS = ("min-entropy", "kl-halt", "learned")
PAPER = ("The paper reports, for SASRec, average gains of +6.8% (ERL) and +8.2% (PRL) over the base model, and a "
         "step oracle (the best reasoning step per sample, chosen after the fact) 30–50% above the readout.")


# ----------------------------------------------------------------------------------------- per-run numbers
def recall(ranks, k):
    return (np.asarray(ranks) <= k).astype(np.float64)


def readout_ranks(record: dict, split: str = "test") -> np.ndarray:
    part = record[split]
    return np.asarray(part.get("readout_ranks", part["ranks"][-1]))


def step_data(record: dict, split: str, samples: dict) -> StepData:
    part = record[split]
    return StepData(part["ranks"], part["entropy"], part["kl"], samples[split]["history_length"])


def metric_table(ranks: np.ndarray) -> Dict[str, np.ndarray]:
    return {"ndcg@10": ndcg(ranks, 10), "ndcg@20": ndcg(ranks, 20), "recall@10": recall(ranks, 10),
            "recall@20": recall(ranks, 20)}


def mean_std(values) -> list:
    """[mean, standard deviation over seeds]; the deviation is None for one seed (not known, not 0)."""
    values = np.asarray(values, dtype=np.float64)
    return [float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else None]


def single_seed_note(a: dict) -> str:
    """A warning for the arms (or their bases) that have one seed: their intervals hold no seed spread."""
    single = [arm for arm, e in a["arms"].items() if len(e["seeds"]) == 1]
    if not single:
        return ""
    one = len(single) == 1
    return (f" {', '.join(single)} {'has' if one else 'have'} one seed so far: an interval that involves "
            f"{'it' if one else 'them'} resamples users only and leaves out the spread between seeds, so it is "
            "narrower than it will be.")


# A seed whose best validation score is below this share of the median of its arm's other seeds is
# flagged as collapsed: it stays in the table, and the report also gives the arm's gain without it.
COLLAPSE_SHARE = 0.5


def collapsed_runs(runs: List[dict]) -> List[dict]:
    """The runs of one arm (two or more seeds) whose best validation score is below ``COLLAPSE_SHARE``
    of the median of the arm's other seeds: seed, best epoch, its score and that median."""
    out = []
    for r in runs:
        others = [o["best_score"] for o in runs if o is not r and o["best_score"] is not None]
        if r["best_score"] is None or not others:
            continue
        median = float(np.median(others))
        if r["best_score"] < COLLAPSE_SHARE * median:
            out.append({"seed": r["seed"], "best_epoch": r["best_epoch"], "valid": float(r["best_score"]),
                        "others_valid": median})
    return out


def collapse_note(a: dict) -> str:
    """One clause per collapsed seed (which, and why it is flagged), then the gain without the collapsed
    seeds of each arm that has them or whose base has them."""
    notes = [f"{arm} seed {c['seed']} collapsed (best epoch {c['best_epoch']}, best validation NDCG@20 "
             f"{c['valid']:.4f} against {c['others_valid']:.4f}, the median of its other seeds)"
             for arm, e in a["arms"].items() for c in e.get("collapsed", [])]
    if not notes:
        return ""
    notes += [f"without {' and '.join(g['dropped'])}, {arm}'s NDCG@20 gain is {ci(g)} (unadjusted)"
              for arm, e in a["arms"].items() for g in [e.get("gain_without_collapsed@20")] if g]
    return (" Collapsed runs (best validation below "
            f"{COLLAPSE_SHARE:g}× the median of the arm's other seeds; they stay in the table above): "
            + "; ".join(notes) + ".")


def fmt(pair, digits=4) -> str:
    return f"{pair[0]:.{digits}f} ± " + ("–" if pair[1] is None else f"{pair[1]:.{digits}f}")


def pct(x) -> str:
    return "" if x is None or not np.isfinite(x) else f"{x * 100:+.1f}%"


def ci(s: dict) -> str:
    return f"{pct(s['gain'])} [{pct(s['low'])}, {pct(s['high'])}]"


def p_text(s: dict, spec: str = ".3g") -> str:
    """A test's Holm-adjusted p; "≤ p" where its bootstrap p sat at the floor (no replicate on the other
    side of zero: ``stats.gain_summary``'s ``p_at_floor``), which bounds the p rather than estimating it."""
    return ("≤ " if s.get("p_at_floor") else "") + format(s["p_holm"], spec)


# ----------------------------------------------------------------------------------------- choosing runs
def chosen_point(records_by_dataset: Dict[str, List[dict]], arm: str, protocol: Protocol):
    """(lr, dropout, provisional): the grid choice of the arm that tunes ``arm`` (on ML-100K), or the
    public code's point while that grid is unfinished."""
    tuner = TUNED_AS.get(arm, arm)
    choice = grid_choice(records_by_dataset.get("ml-100k", []), tuner, protocol)
    if choice is None:
        return protocol.grid_lr[0], protocol.grid_dropout[0], True
    return choice[0], choice[1], False


def arm_runs(records: List[dict], arm: str, lr: float, dropout: float) -> List[dict]:
    runs = [r for r in records if r["arm"] == arm and r["lr"] == lr and r["dropout"] == dropout
            and r["role"] != "diagnosis" and "test" in r]
    return sorted(runs, key=lambda r: r["seed"])


# ----------------------------------------------------------------------------------------- analysis
def analyse_dataset(dataset: str, records: List[dict], samples: dict, records_by_dataset, protocol: Protocol) -> dict:
    users = np.asarray(samples["test"]["user"])
    fingerprints = {r["samples_fingerprint"] for r in records}
    if fingerprints - {samples["fingerprint"]}:
        raise ValueError(f"{dataset}: some result files were computed on other samples than samples.json "
                         f"(fingerprints {sorted(fingerprints)}); rerun them or restore samples.json")
    out = {"n_test_samples": len(users), "n_test_users": int(np.unique(users).size),
           "sample_counts": {k: v for k, v in samples["stats"].items() if k.endswith(("_kept_window", "_kept_strict"))},
           "arms": {}, "grid": {}, "runs": []}
    for r in records:
        out["runs"].append({k: r[k] for k in ("name", "role", "status", "best_epoch", "epochs_run", "best_score",
                                              "seconds_per_epoch")})
    for r in records:
        if r["role"] == "grid":
            out["grid"].setdefault(r["arm"], {})[f"lr {r['lr']:g}, dropout {r['dropout']:g}"] = {
                "valid": r["best_score"], "best_epoch": r["best_epoch"]}
    per_sample: Dict[str, Dict[str, np.ndarray]] = {}
    for arm in reported_arms(dataset, protocol):
        lr, dropout, provisional = chosen_point(records_by_dataset, arm, protocol)
        runs = arm_runs(records, arm, lr, dropout)
        if not runs:
            continue
        tables = [metric_table(readout_ranks(r)) for r in runs]
        per_sample[arm] = {m: np.stack([t[m] for t in tables]) for m in tables[0]}
        entry = {"lr": lr, "dropout": dropout, "provisional_choice": provisional, "seeds": [r["seed"] for r in runs],
                 "best_epochs": [r["best_epoch"] for r in runs], "status": [r["status"] for r in runs],
                 "collapsed": collapsed_runs(runs),
                 "metrics": {m: mean_std(v.mean(axis=1)) for m, v in per_sample[arm].items()},
                 "user_averaged_ndcg@10": user_averaged(per_sample[arm]["ndcg@10"], users)}
        n_steps = len(runs[0]["test"]["ranks"])
        entry["steps"] = {f"r{s}": mean_std([ndcg(np.asarray(r["test"]["ranks"][s]), 20).mean() for r in runs])
                          for s in range(n_steps)}
        entry["step_oracle"] = mean_std([ndcg(np.min(r["test"]["ranks"], axis=0), 20).mean() for r in runs])
        if arm == "base":  # each noise oracle beside the mean readout of the same runs it is made from
            with_draws = [r for r in runs if "mc_dropout_ranks" in r["test"]]
            if with_draws:
                draws = [np.asarray(r["test"]["mc_dropout_ranks"]) for r in with_draws]
                entry["mc_dropout_single"] = mean_std([ndcg(d, 20).mean() for d in draws])
                entry["mc_dropout_oracle"] = mean_std([ndcg(d.min(axis=0), 20).mean() for d in draws])
                entry["mc_dropout_draws"] = int(draws[0].shape[0])
                entry["mc_dropout_base"] = float(np.mean([ndcg(readout_ranks(r), 20).mean() for r in with_draws]))
            if len(runs) >= 2:
                pool = np.stack([readout_ranks(r) for r in runs[:protocol.mc_draws]])
                entry["seed_oracle"] = {"seeds": len(pool), "ndcg@20": float(ndcg(pool.min(axis=0), 20).mean()),
                                        "base_ndcg@20": float(np.mean([ndcg(p, 20).mean() for p in pool]))}
        if arm in SELECTOR_ARMS and n_steps >= 2:
            entry["selectors"] = selector_summary(runs, samples, users)
        out["arms"][arm] = entry
    # Each arm against its own backbone's base (SASRec arms against "base", BERT4Rec's against
    # "bert4rec-base"), Holm-adjusted across all of them.
    pairs = [(a, base_arm(a)) for a in per_sample if a != base_arm(a) and base_arm(a) in per_sample]
    for metric in ("ndcg@10", "ndcg@20"):
        tests = [gain_summary(per_sample[a][metric], per_sample[b][metric], users, ROUNDS, seed=17) for a, b in pairs]
        for (a, b), s, p in zip(pairs, tests, holm([t["p"] for t in tests])):
            out["arms"][a].setdefault("gain_over_base", {})[metric] = dict(s, p_holm=p, base=b)
    # Sensitivity: where the arm or its base has a collapsed seed, the gain without those seeds (outside
    # Holm). A collapsed base seed weakens the base and so inflates every gain over it.
    for a, b in pairs:
        gone = {arm: {c["seed"] for c in out["arms"][arm]["collapsed"]} for arm in (a, b)}
        keep = {arm: [i for i, seed in enumerate(out["arms"][arm]["seeds"]) if seed not in gone[arm]] for arm in (a, b)}
        if (gone[a] or gone[b]) and keep[a] and keep[b]:
            out["arms"][a]["gain_without_collapsed@20"] = dict(
                gain_summary(per_sample[a]["ndcg@20"][keep[a]], per_sample[b]["ndcg@20"][keep[b]], users, ROUNDS, seed=17),
                dropped=[f"{arm} seed {seed}" for arm in (a, b) for seed in sorted(gone[arm])])
    for a, b in pairs:
        of = out["arms"][b]["user_averaged_ndcg@10"]  # 0 only on toy data: no gain then (NaN), not a crash
        out["arms"][a]["user_averaged_gain@10"] = out["arms"][a]["user_averaged_ndcg@10"] / of - 1 if of > 0 else math.nan
    out["selector_tests"] = adjust_selectors(out["arms"])
    return out


def selector_summary(runs: List[dict], samples: dict, users: np.ndarray) -> dict:
    """Selectors fitted on each run's validation outputs, scored on its test outputs; means over runs,
    and the gain of each adaptive selector over the best fixed step (seeds paired, users clustered)."""
    results = [evaluate_selectors(step_data(r, "valid", samples), step_data(r, "test", samples), readout_ranks(r),
                                  seed=r["seed"]) for r in runs]
    names = [n for n in results[0] if n not in ("oracle",)]
    summary = {n: {k: float(np.mean([res[n][k] for res in results]))
                   for k in ("ndcg@10", "ndcg@20", "mean_step", "steps_computed")} for n in names}
    summary["oracle"] = {"ndcg@20": float(np.mean([res["oracle"]["ndcg@20"] for res in results]))}
    # Gap closed from the seed means (the table's own numbers), not a mean of per-run ratios, which a
    # run whose step oracle barely beats its readout would dominate.
    readout, gap = summary["readout"]["ndcg@20"], summary["oracle"]["ndcg@20"] - summary["readout"]["ndcg@20"]
    for n in names:
        summary[n]["gap_closed"] = (summary[n]["ndcg@20"] - readout) / gap if gap > 0 else float("nan")
    summary["fixed"]["steps"] = [res["fixed"]["step"] for res in results]
    summary["kl-halt"]["eps"] = [res["kl-halt"]["eps"] for res in results]
    # Gains over the best fixed step. Holm-adjusted later, across every arm's adaptive selectors
    # (:func:`adjust_selectors`); the placebo is a reference, outside the family (its p stays unadjusted).
    fixed = np.stack([res["fixed"]["per_sample_ndcg@20"] for res in results])
    for n in ADAPTIVE_SELECTORS + ("random",):
        summary[n]["gain_over_fixed@20"] = dict(
            gain_summary(np.stack([res[n]["per_sample_ndcg@20"] for res in results]), fixed, users, ROUNDS, seed=23,
                         paired_seeds=True), p_holm=None)
    return summary


def adjust_selectors(arms: Dict[str, dict]) -> int:
    """Holm-adjust the adaptive selectors' gains over the best fixed step as one family: every
    (arm, adaptive selector) pair, since the target's verdict is met by any of them. Returns its size."""
    family = [(arm, n) for arm, e in arms.items() if "selectors" in e for n in ADAPTIVE_SELECTORS]
    tests = [arms[arm]["selectors"][n]["gain_over_fixed@20"] for arm, n in family]
    for test, p in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = p
    return len(family)


# ----------------------------------------------------------------------------------------- the report
def protocol_sentence(protocol: Protocol) -> str:
    return ("Protocol: the paper's global temporal split (interactions before the 0.8 / 0.9 time quantiles train / "
            "validate, the rest test; ratings > 3), and a validation or test sample is dropped only when its target "
            f"or an item among its newest {protocol.model_size['max_len']} history items (the model's window) is "
            "unseen in training (the public code's rule; `--sample-filter strict` drops it for any unseen item of "
            "the whole history).")


def dataset_section(dataset: str, a: dict, protocol: Protocol) -> List[str]:
    counts = a["sample_counts"]
    lines = [f"## {dataset}", "",
             f"Test: {a['n_test_samples']} samples from {a['n_test_users']} users (window rule: valid "
             f"{counts.get('valid_kept_window')}, test {counts.get('test_kept_window')}; strict rule: valid "
             f"{counts.get('valid_kept_strict')}, test {counts.get('test_kept_strict')}).", ""]
    if a["grid"]:
        points = sorted({p for g in a["grid"].values() for p in g})
        lines += ["### Tuning grid (seed 0, best validation NDCG@20, best epoch)", "",
                  "| arm | " + " | ".join(points) + " |", "|---|" + "---|" * len(points)]
        for arm, g in a["grid"].items():
            cells = [f"{g[p]['valid']:.4f} (ep {g[p]['best_epoch']})" if p in g and g[p]["valid"] is not None
                     else "" for p in points]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    if not a["arms"]:
        return lines + ["No finished run yet.", ""]
    lines += ["### Test metrics (mean ± std over seeds)", "",
              "| arm | lr, dropout | seeds | best epochs | NDCG@10 | NDCG@20 | Recall@10 | Recall@20 | "
              "gain NDCG@10 [95% CI] | Holm p | gain NDCG@20 [95% CI] | Holm p |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, e in a["arms"].items():
        g = e.get("gain_over_base", {})
        cells = [f"{e['lr']:g}, {e['dropout']:g}" + (" (provisional)" if e["provisional_choice"] else ""),
                 str(len(e["seeds"])), str(e["best_epochs"])]
        cells += [fmt(e["metrics"][m]) for m in ("ndcg@10", "ndcg@20", "recall@10", "recall@20")]
        for m in ("ndcg@10", "ndcg@20"):
            cells += [ci(g[m]), p_text(g[m])] if m in g else ["", ""]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Robustness (user-averaged: each user's mean NDCG@10, then the mean over users): "
              + "; ".join(f"{arm} {e['user_averaged_ndcg@10']:.4f}"
                          + (f" ({pct(e['user_averaged_gain@10'])})" if "user_averaged_gain@10" in e else "")
                          for arm, e in a["arms"].items()) + ".", "",
              f"Gains: relative to the arm's own backbone without reasoning (base; bert4rec-base for the bert4rec arms) on the seed-mean; 95% intervals and p-values from a user-clustered paired "
              f"bootstrap, hierarchical over seeds and users ({ROUNDS} replicates), Holm-adjusted across arms."
              + single_seed_note(a) + collapse_note(a), ""]
    lines += steps_section(a)
    lines += selectors_section(a)
    return lines


def steps_section(a: dict) -> List[str]:
    lines = ["### Per reasoning step and three oracles (test NDCG@20)", "",
             "| arm | r0 | r1 | r2 | r3 | readout | step oracle | oracle vs readout |", "|---|---|---|---|---|---|---|---|"]
    for arm, e in a["arms"].items():
        cells = [fmt(e["steps"][f"r{s}"]) if f"r{s}" in e["steps"] else "" for s in range(4)]
        readout, oracle = e["metrics"]["ndcg@20"][0], e["step_oracle"][0]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {readout:.4f} | {oracle:.4f} | {pct(oracle / readout - 1)} |")
    base = a["arms"].get("base")
    lines.append("")
    if base is not None:
        notes = []
        for name, oracle, of in noise_oracles(base):
            if name == "mc-dropout":
                notes.append(f"MC-dropout oracle (per sample the best of {base['mc_dropout_draws']} dropout-on passes "
                             f"of base): {oracle:.4f} ({pct(oracle / of - 1)} vs those runs' readout, {of:.4f}; one "
                             f"such pass alone {base['mc_dropout_single'][0]:.4f})")
            else:
                notes.append(f"seed oracle (per sample the best of {base['seed_oracle']['seeds']} base seeds): "
                             f"{oracle:.4f} ({pct(oracle / of - 1)} vs those seeds' mean readout, {of:.4f})")
        if "seed_oracle" not in base:
            notes.append("seed oracle: needs at least two finished base seeds")
        lines += ["Deflating the step oracle: " + "; ".join(notes) + ".", ""]
        lines += [oracle_verdict(a), ""]
    return lines


def noise_oracles(base: dict) -> List[tuple]:
    """(name, oracle NDCG@20, mean readout NDCG@20 of the runs it is made from) of base's noise oracles:
    an oracle over some of the seeds is compared with those seeds, not with every seed's mean."""
    out = []
    if "mc_dropout_oracle" in base:
        out.append(("mc-dropout", base["mc_dropout_oracle"][0], base["mc_dropout_base"]))
    if "seed_oracle" in base:
        out.append(("seed", base["seed_oracle"]["ndcg@20"], base["seed_oracle"]["base_ndcg@20"]))
    return out


def oracle_verdict(a: dict) -> str:
    base = a["arms"]["base"]
    noise = noise_oracles(base)
    reasoning = {arm: e["step_oracle"][0] / e["metrics"]["ndcg@20"][0] - 1 for arm, e in a["arms"].items()
                 if arm in REASONING_ARMS}
    if not noise or not reasoning:
        return "Verdict on the step oracle: not enough finished runs yet (needs base and a reasoning arm)."
    noise_gain = max(oracle / of - 1 for _, oracle, of in noise)
    step_gain = float(np.mean(list(reasoning.values())))
    mostly = noise_gain >= 0.7 * step_gain
    return (f"Verdict: the step oracle sits {pct(step_gain)} above the readout (mean over the SASRec reasoning arms, whose base this is) and the best "
            f"noise oracle {pct(noise_gain)} above base, so the step oracle is "
            + ("mostly \"best of several noisy draws\": taking the best of a few random variations of base gets most "
               "of the way." if mostly else "more than \"best of several noisy draws\": noise alone gets less than "
               "70% of the way."))


def selectors_section(a: dict) -> List[str]:
    arms = {arm: e["selectors"] for arm, e in a["arms"].items() if "selectors" in e}
    if not arms:
        return []
    lines = ["### Adaptive depth (fitted on validation, scored on test)", "",
             "| arm | selector | NDCG@10 | NDCG@20 | gap closed | mean step | steps computed | "
             "gain NDCG@20 vs best fixed [95% CI] | Holm p |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, sel in arms.items():
        for name in ("readout", "fixed", "min-entropy", "kl-halt", "learned", "random"):
            s = sel[name]
            g = s.get("gain_over_fixed@20")
            label = name + (f" (r{sel['fixed']['steps']})" if name == "fixed" else "")
            lines.append(f"| {arm} | {label} | {s['ndcg@10']:.4f} | {s['ndcg@20']:.4f} | {pct(s['gap_closed'])} | "
                         f"{s['mean_step']:.2f} | {s['steps_computed']:.2f} | {ci(g) if g else ''} | "
                         f"{'' if g is None else '–' if g['p_holm'] is None else p_text(g)} |")
        lines.append(f"| {arm} | step oracle |  | {sel['oracle']['ndcg@20']:.4f} | +100.0% |  |  |  |  |")
    lines += ["", "kl-halt is the selector a server can use to save work (users stop reasoning at different depths); "
              "`ReaRec.halting_readout(states, eps)` applies it (parity-tested against this table's selector), "
              "and both `ReaRec` and `FastReaRec` serve it as `readout=\"adaptive\"` at `config.halt_kl` (in the "
              "engine, halted users leave the decode batch; each decision streams the item table once). For ERL (readout: the mean of the steps) the selectors "
              "choose among single steps, each weaker than the mean, so a negative gap closed there says that the "
              "ensemble beats any single step, not that adaptive depth failed; a selector over {steps, mean} would "
              "need the mean's entropy in the result files.", "",
              "Gap closed: (selector − readout) / (step oracle − readout) on NDCG@20, from the means over seeds in "
              "this table. Random: the placebo, the best adaptive selector's steps in shuffled order (a reference: "
              f"outside the Holm family). Holm p: adjusted across every arm's adaptive selectors ({a.get('selector_tests', 0)} "
              "tests: the target below is met by any of them); the intervals are unadjusted. Target: an "
              "adaptive selector that closes ≥ 25% of the gap with its interval over the best fixed step above zero "
              "and its Holm p below 0.05 — " + selector_verdict(arms) + ".", ""]
    return lines


def selector_verdict(arms: dict) -> str:
    hits = [f"{arm} {name}" for arm, sel in arms.items() for name in ADAPTIVE_SELECTORS
            if sel[name]["gap_closed"] >= 0.25 and sel[name]["gain_over_fixed@20"]["low"] > 0
            and sel[name]["gain_over_fixed@20"]["p_holm"] < 0.05]
    return ("met by " + ", ".join(hits)) if hits else "not met by any selector here (an honest negative)"


def diagnosis_section(records: List[dict], protocol: Protocol, records_by_dataset) -> List[str]:
    lr, dropout, provisional = chosen_point(records_by_dataset, "prl", protocol)
    reference = [r for r in records if r["arm"] == "prl" and r["seed"] == 0 and r["lr"] == lr and r["dropout"] == dropout]
    rows = reference + [r for r in records if r["arm"] in DIAGNOSES and r["lr"] == lr and r["dropout"] == dropout]
    lines = ["## PRL diagnosis (ML-100K, seed 0, validation)", "",
             f"Variants of PRL at its tuned lr {lr:g} and dropout {dropout:g}"
             + (" (provisional: PRL's grid is unfinished)" if provisional else "") + ": " + ", ".join(
                 f"{n} ({', '.join(f'{k}={v}' for k, v in DIAGNOSES[n].items() if k not in ('objective', 'reason_steps'))})"
                 for n in DIAGNOSES) + ". Loss terms: measured after each epoch on 2048 fixed training samples "
             "without dropout; state norm: the mean L2 norm of r_0..r_K. A variant that beats PRL on validation "
             "becomes a documented option with its test result, read only for such a variant (beside PRL's "
             "seed 0; one seed each, so a hint rather than a finding). The options above already are: `cl_weight`, "
             "`pl_weight`, `warmup_epochs`, `noise_std`, `cl_mask_same_user`, `cl_similarity`, `cl_temperature`.", ""]
    if not rows:
        return lines + ["No diagnosis run finished yet.", ""]
    lines += ["| variant | status | best epoch | valid NDCG@20 | test NDCG@20 | ce_last | pl | infonce | "
              "state norms r0..rK (best epoch) |", "|---|---|---|---|---|---|---|---|---|"]
    prl_valid = reference[0]["best_score"] if reference else None
    for r in rows:
        best = next((h for h in r["history"] if h["epoch"] == r["best_epoch"]), {})
        valid = r["best_score"]  # None: diverged before its first epoch ended (no test either)
        read_test = "test" in r and (r["arm"] == "prl" or (None not in (prl_valid, valid) and valid > prl_valid))
        test = f"{float(ndcg(readout_ranks(r), 20).mean()):.4f}" if read_test else "–"
        lines.append(f"| {r['arm']} | {r['status']} | {r['best_epoch']} | {'' if valid is None else format(valid, '.4f')} | "
                     f"{test} | "
                     + " | ".join(f"{best[k]:.4f}" if k in best else "" for k in ("ce_last", "pl", "infonce"))
                     + f" | {best.get('state_norm', '')} |")
    return lines + [""]


def bf16_twin_section(records: List[dict], protocol: Protocol, records_by_dataset) -> List[str]:
    """Each bf16 twin beside its fp32 run (same arm, seed, lr and dropout): best epoch, validation and
    test NDCG@20, and the mean |bf16 - fp32| test and best-validation gaps, each against the fp32 arm's
    spread over seeds (a twin that picks another epoch of a flat validation curve moves its test score
    more than its validation score)."""
    lines = ["## bf16 twins (ML-100K): is mixed precision safe for the runs that use it?", "",
             f"Runs on {', '.join(protocol.bf16_datasets) or 'no dataset'} train with the forward under bf16 autocast "
             "(`TrainConfig(bf16=True)`; validation, test and every result stay fp32), about a third less compute. "
             f"The check: {', '.join(protocol.bf16_twin_arms)} train again in bf16 on ML-100K at seeds "
             f"0..{protocol.bf16_twin_seeds - 1}, each beside its fp32 run of the same arm, seed, lr and dropout. "
             "What to read: the mean signed gap (a shift bf16 would bring to every arm) and the size of the gaps "
             "against the fp32 seed spread (bf16 as one more source of run-to-run noise). Where a dataset trains "
             "in bf16, every arm on it does: its comparisons are bf16 against bf16.", ""]
    twins = sorted((r for r in records if twin_of(r["arm"]) and "test" in r), key=lambda r: (r["arm"], r["seed"]))
    pairs = []
    for twin in twins:
        fp32 = [r for r in records if r["arm"] == twin_of(twin["arm"]) and r["seed"] == twin["seed"]
                and r["lr"] == twin["lr"] and r["dropout"] == twin["dropout"] and "test" in r]
        if fp32:
            pairs.append((fp32[0], twin))
    if not pairs:
        return lines + ["No twin has finished together with its fp32 run yet.", ""]
    lines += ["| arm | seed | best epoch fp32 / bf16 | valid NDCG@20 fp32 / bf16 | test NDCG@20 fp32 / bf16 | bf16 − fp32 |",
              "|---|---|---|---|---|---|"]
    gaps = {}
    for fp32, twin in pairs:
        test = [float(ndcg(readout_ranks(r), 20).mean()) for r in (fp32, twin)]
        gaps.setdefault(fp32["arm"], []).append((test[1] - test[0], twin["best_score"] - fp32["best_score"]))
        lines.append(f"| {fp32['arm']} | {fp32['seed']} | {fp32['best_epoch']} / {twin['best_epoch']} | "
                     f"{fp32['best_score']:.4f} / {twin['best_score']:.4f} | {test[0]:.4f} / {test[1]:.4f} | "
                     f"{test[1] - test[0]:+.4f} |")
    lines.append("")

    def spread(values):
        return f"{np.std(values, ddof=1):.4f} over {len(values)} fp32 seeds" if len(values) >= 2 else "not known yet"

    for arm, arm_gaps in gaps.items():
        test_gaps, valid_gaps = np.abs(np.array(arm_gaps)).T
        lr, dropout, _ = chosen_point(records_by_dataset, arm, protocol)
        runs = arm_runs(records, arm, lr, dropout)
        shift = float(np.mean([g[0] for g in arm_gaps]))
        lines.append(f"- {arm}: mean bf16 − fp32 test NDCG@20 {shift:+.4f}, mean |bf16 − fp32| {test_gaps.mean():.4f} over {len(test_gaps)} "
                     f"seed(s); the fp32 seed std is {spread([float(ndcg(readout_ranks(r), 20).mean()) for r in runs])}. "
                     f"Best validation NDCG@20, which picks the epoch: mean |bf16 − fp32| {valid_gaps.mean():.4f}; "
                     f"the fp32 seed std is {spread([r['best_score'] for r in runs])}.")
    return lines + [""]


def compute_section(rows: List[dict]) -> List[str]:
    """The planned compute, from :func:`rearec.study.compute_plan`'s rows."""
    groups: Dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["role"]), []).append(r)
    lines = ["## Planned compute", "", "| dataset | runs | planned | finished | estimated hours to go |", "|---|---|---|---|---|"]
    for (dataset, role), rs in groups.items():
        lines.append(f"| {dataset} | {role} | {len(rs)} | {sum(r['done'] for r in rs)} | "
                     f"{sum(r['minutes'] for r in rs) / 60:.1f} |")
    todo = sum(r["minutes"] for r in rows) / 60
    return lines + ["", f"About {todo:.0f} hours to go on one 1-thread process (runs × estimated minutes: measured "
                    "epochs × seconds of finished runs of the arm, else assumed ones; an ML-1M epoch ~10× ML-100K's, the "
                    "ratio of their training samples). Continue with `rearec study --run --threads 1`, started in "
                    "as many processes as there are cores (each takes the next run no other process is training; "
                    "a run waits for the grid it depends on); then `rearec study` rewrites this report.", ""]


def runs_section(analysis: Dict[str, dict]) -> List[str]:
    lines = ["## Every finished run", "", "| dataset | run | role | status | best epoch | epochs run | valid NDCG@20 | "
             "s / epoch |", "|---|---|---|---|---|---|---|---|"]
    for dataset, a in analysis.items():
        for r in a["runs"]:
            lines.append(f"| {dataset} | {r['name']} | {r['role']} | {r['status']} | {r['best_epoch']} | "
                         f"{r['epochs_run']} | {'' if r['best_score'] is None else format(r['best_score'], '.4f')} | "
                         f"{'' if r['seconds_per_epoch'] is None else format(r['seconds_per_epoch'], '.0f')} |")
    return lines + [""]


def paper_paragraph(analysis: Dict[str, dict]) -> str:
    parts = []
    for dataset, a in analysis.items():
        arms = a["arms"]
        def gain(arm):
            g = arms[arm]["gain_over_base"]["ndcg@10"]
            return f"{ci(g)} (Holm p {p_text(g, '.2g')})"
        gains = [f"{arm.upper()} {gain(arm)} on NDCG@10" for arm in ("erl", "prl") if arm in arms and "gain_over_base" in arms[arm]]
        gains += [f"PRL without its contrastive term ({arm}, picked by the diagnosis) {gain(arm)}"
                  for arm in CONFIRMATIONS if arm in arms and "gain_over_base" in arms[arm]]
        oracles = [f"{arm.upper()}'s step oracle {pct(arms[arm]['step_oracle'][0] / arms[arm]['metrics']['ndcg@20'][0] - 1)}"
                   f" above its readout" for arm in ("erl", "prl") if arm in arms]
        if gains or oracles:
            parts.append(f"on {dataset}, " + "; ".join(gains + oracles))
    if not parts:
        return PAPER + " No finished runs to compare yet."
    return (PAPER + " Here (so far): " + "; ".join(parts) + ". Read the gains against their intervals and Holm p: an "
            "interval that contains zero is no evidence of a gain, and one that excludes it is a gain only when its "
            "Holm p (corrected for the number of arms compared) is below 0.05, since the intervals are not adjusted; "
            "the oracle rows above say how much of a step oracle any model's noise would give.")


def training_seconds(record: dict) -> float:
    """A run's training time: its epochs' seconds (training and validation), over every invocation
    (a resumed run's ``wall_seconds`` counts only its last one, plus its final evaluation)."""
    return sum(h["seconds"] for h in record.get("history", []))


def write_study_report(protocol: Optional[Protocol], results_dir: str, out_dir: str, report_path: str,
                       log=print) -> dict:
    """Read every result file, write ``results.json``, the plots and the Markdown report; returns the summary."""
    records_by_dataset = {d: [r for r in read_results(results_dir, d)] for d in DATASETS}
    finished = [r for rs in records_by_dataset.values() for r in rs]
    log(f"report: {len(finished)} result files read from {results_dir}")
    protocol = protocol_of(finished, protocol)
    analysis = {}
    for dataset, records in records_by_dataset.items():
        path = os.path.join(results_dir, dataset, "samples.json")
        if records and os.path.exists(path):
            log(f"report: {dataset}: bootstrap and selectors over {len(records)} runs")
            analysis[dataset] = analyse_dataset(dataset, records, read_json(path, "study samples"), records_by_dataset,
                                                protocol)
    rows = compute_plan(protocol, results_dir)  # a result of a run outside the plan is no planned run finished
    summary = {"planned_runs": len(rows), "finished_runs": sum(r["done"] for r in rows), "protocol": protocol.to_dict(),
               "datasets": analysis,
               "training_hours_of_finished_runs": round(sum(training_seconds(r) for r in finished) / 3600, 2),
               "runs_with_epochs_at_several_threads": [r["name"] for r in finished
                                                       if any(h.get("threads", 1) != 1 for h in r.get("history", []))]}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "results.json"), summary)
    log("report: plots")
    figures = plot(analysis, records_by_dataset, out_dir)
    write_markdown(summary, analysis, records_by_dataset, protocol, report_path, figures,
                   compute_section(rows))
    return summary


def write_markdown(summary, analysis, records_by_dataset, protocol: Protocol, report_path: str, figures,
                   compute_lines: List[str]) -> None:
    out = os.path.dirname(report_path) or "."
    partial = summary["finished_runs"] < summary["planned_runs"]
    lines = ["# Quality study v2: ReaRec on MovieLens-100K and MovieLens-1M", ""]
    if partial:
        lines += [f"**Partial: {summary['finished_runs']} of {summary['planned_runs']} planned runs have finished.** "
                  "Every number below is provisional; `rearec study --run` continues the study and `rearec study` "
                  "rewrites this file from the committed results.", ""]
    size = protocol.model_size
    lines += [protocol_sentence(protocol), "",
              f"Runs: hidden {size['hidden_size']}, {size['n_layers']} layers, {size['n_heads']} heads, inner "
              f"{size['inner_size']}, max_len {size['max_len']}; Adam, batch {protocol.batch_size}; early stopping on "
              f"validation {protocol.metric.upper().replace('NDCG', 'NDCG')} with patience {protocol.patience} and a "
              f"cap of {protocol.max_epochs} epochs (every run's best epoch is listed). Tuning: learning rate "
              f"{{{', '.join(f'{x:g}' for x in protocol.grid_lr)}}} × dropout "
              f"{{{', '.join(f'{x:g}' for x in protocol.grid_dropout)}}} for base, ERL and PRL on ML-100K (seed 0), "
              "chosen on validation; PRL at K = 1 and 3 and the diagnosis use PRL's choice, ML-1M uses ML-100K's. "
              f"Seeds: {protocol.seeds['ml-100k']} per arm on ML-100K, {protocol.seeds['ml-1m']} on ML-1M. "
              + "".join(f"{arm} is the diagnosis variant {CONFIRMATIONS[arm]} (it beat PRL on validation at seed 0), "
                        f"trained as an arm on ML-100K at seeds {', '.join(map(str, protocol.confirmation_seeds))}, "
                        "which took no part in picking it, and on ML-1M beside PRL at its seeds; it uses PRL's choice "
                        "of lr and dropout. "
                        for arm in protocol.confirmation_arms)
              + (f"Mixed precision (bf16 autocast in training, fp32 evaluation) on {', '.join(protocol.bf16_datasets)}; "
                 "see the bf16 twins. " if protocol.bf16_datasets else "") +
              f"Training time of the finished runs: {summary['training_hours_of_finished_runs']} h (the sum of their "
              "epochs' wall time, validation and any pause included; shared 2-core CPU, 1 thread per run"
              + (f", except some epochs of {', '.join(summary['runs_with_epochs_at_several_threads'])} at more threads "
                 "(their histories say which)" if summary["runs_with_epochs_at_several_threads"] else "") + ").", ""]
    for dataset, a in analysis.items():
        lines += dataset_section(dataset, a, protocol)
    if "ml-100k" in records_by_dataset:
        lines += diagnosis_section(records_by_dataset["ml-100k"], protocol, records_by_dataset)
        lines += bf16_twin_section(records_by_dataset["ml-100k"], protocol, records_by_dataset)
    lines += runs_section(analysis) + compute_lines
    if figures:
        lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in figures] + [""]
    lines += ["## Compared with the paper", "", paper_paragraph(analysis), ""]
    write_text(report_path, "\n".join(lines))


def save_figure(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", metadata={"Software": None}))
    plt.close(fig)
    return path


def plot(analysis: Dict[str, dict], records_by_dataset, out_dir: str) -> List[str]:
    """steps.png (NDCG@20 per step with the oracles) and loss_terms.png (PRL terms per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    with_arms = {d: a for d, a in analysis.items() if a["arms"]}
    if with_arms:
        fig, axes = plt.subplots(1, len(with_arms), figsize=(6 * len(with_arms), 4), squeeze=False)
        for ax, (dataset, a) in zip(axes[0], with_arms.items()):
            for arm, e in a["arms"].items():
                steps = sorted(e["steps"], key=lambda s: int(s[1:]))
                xs = [int(s[1:]) for s in steps]
                line = ax.errorbar(xs, [e["steps"][s][0] for s in steps], yerr=[e["steps"][s][1] or 0.0 for s in steps],
                                   marker="o", capsize=3, label=f"{arm} ({len(e['seeds'])} seed(s))")
                ax.plot([xs[-1] + 0.15], [e["step_oracle"][0]], marker="*", markersize=11,
                        color=line[0].get_color(), linestyle="none")
            ax.set_xlabel("reasoning state used alone (stars: step oracle)")
            ax.set_ylabel("test NDCG@20")
            ax.set_title(f"{dataset}: NDCG@20 per step (mean ± std over seeds)")
            ax.legend(fontsize=8)
        paths.append(save_figure(fig, os.path.join(out_dir, "steps.png")))
    prl = [r for r in records_by_dataset.get("ml-100k", []) if r["arm"].startswith("prl") and r["seed"] == 0
           and r["history"] and "ce_last" in r["history"][0]]
    if prl:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for r in prl:
            epochs = [h["epoch"] for h in r["history"]]
            for ax, term in zip(axes, ("ce_last", "pl", "infonce")):
                ax.plot(epochs, [h.get(term, np.nan) for h in r["history"]], label=r["name"])
                ax.set_title(f"{term} per epoch (2048 training samples, no dropout)")
                ax.set_xlabel("epoch")
        axes[0].legend(fontsize=7)
        paths.append(save_figure(fig, os.path.join(out_dir, "loss_terms.png")))
    return paths
