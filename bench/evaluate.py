"""Evaluate the quality checks on a labelled set from the simulator.

The set: many seeds x each defect x several severities, plus pristine frames, optionally real
photographs (tests/data) placed in a simulated lens field with the same defects. For each frame
the ground truth is :func:`sim.scene.expected_reasons`. Printed, for a person and as JSON:

- per check: precision and recall over every frame with a defect at severity >= 1 (the levels
  issue 4 requires catching) and the pristine frames;
- per defect and severity: recall (all expected checks tripped) and exactness (nothing else);
- the false-retake rate on pristine frames;
- focus-score monotonicity with blur: the share of seeds whose focus score falls strictly with
  every step of defocus, and the share of concordant pairs;
- score distributions per check (positives vs negatives), which is what the default
  thresholds in :class:`~device_agent.camera.quality.Thresholds` were set from.

Run: ``python bench/evaluate.py [--seeds N] [--json]``. It imports the simulator: a
development tool in bench/, not part of the device's install.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from device_agent.camera.quality import CHECK_NAMES, Thresholds, assess

SEVERITIES = (0.5, 1.0, 1.5, 2.0)
FOCUS_LADDER = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
PHOTOS = ("astronaut.jpg", "chelsea.jpg")
_PHOTO_SIZE = {"astronaut.jpg": (640, 480), "chelsea.jpg": (400, 300)}


@dataclass(frozen=True)
class Case:
    """One labelled frame to render and assess."""

    source: str  # "sim" or a photo file name
    seed: int
    defect: str | None
    severity: float
    width: int
    height: int
    frame_index: int = 0


@dataclass(frozen=True)
class Outcome:
    case: Case
    reasons: tuple[str, ...]
    scores: dict[str, float]
    judged: tuple[str, ...]


def build_cases(
    seeds: int, width: int, height: int, photos: bool, photo_seeds: int, data_dir: Path
) -> list[Case]:
    from sim.scene import DEFECTS

    cases: list[Case] = []
    for seed in range(1, seeds + 1):
        # Pristine twice per seed (two noise draws), so false retakes are measured on 2N frames.
        cases += [Case("sim", seed, None, 0.0, width, height, i) for i in (0, 1)]
        for defect in DEFECTS:
            cases += [Case("sim", seed, defect, s, width, height) for s in SEVERITIES]
        cases += [
            Case("sim", seed, "defocus", s, width, height)
            for s in FOCUS_LADDER
            if s not in SEVERITIES
        ]
    if photos:
        for name in PHOTOS:
            if not (data_dir / name).exists():
                continue
            w, h = _PHOTO_SIZE[name]
            for seed in range(1, photo_seeds + 1):
                cases += [Case(name, seed, None, 0.0, w, h, i) for i in (0, 1)]
                for defect in DEFECTS:
                    cases += [Case(name, seed, defect, s, w, h) for s in SEVERITIES]
                cases += [
                    Case(name, seed, "defocus", s, w, h)
                    for s in FOCUS_LADDER
                    if s not in SEVERITIES
                ]
    return cases


_PHOTO_CACHE: dict[str, np.ndarray] = {}


def _run(args: tuple[Case, Thresholds, str]) -> Outcome:
    from device_agent.camera.imagefile import load_image
    from sim.scene import SceneSpec, photo_frame, render

    case, thresholds, data_dir = args
    spec = SceneSpec(
        seed=case.seed,
        width=case.width,
        height=case.height,
        defect=case.defect,
        severity=case.severity,
    )
    if case.source == "sim":
        image = render(spec, case.frame_index)
    else:
        if case.source not in _PHOTO_CACHE:
            _PHOTO_CACHE[case.source] = load_image(Path(data_dir) / case.source)
        image = photo_frame(_PHOTO_CACHE[case.source], spec, case.frame_index)
    report = assess(image, thresholds)
    return Outcome(
        case=case,
        reasons=tuple(report.reasons),
        scores=report.scores,
        judged=tuple(c.name for c in report.checks if c.judged),
    )


def run_cases(
    cases: Sequence[Case], thresholds: Thresholds, data_dir: Path, workers: int,
    progress: bool = False,
) -> list[Outcome]:
    """Assess every case; ``progress`` shows a bar on stderr (a full run takes minutes)."""
    jobs = [(c, thresholds, str(data_dir)) for c in cases]
    bar = functools.partial(tqdm, total=len(jobs), desc="frames", unit="frame",
                            disable=not progress)
    if workers <= 1:
        return list(bar(map(_run, jobs)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(bar(pool.map(_run, jobs, chunksize=4)))


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def summarise(outcomes: Iterable[Outcome], source: str) -> dict[str, Any]:
    """Figures for the outcomes of one source: "sim", "photos" (all photographs) or one
    photograph's file name."""
    from sim.scene import expected_reasons

    if source in ("sim", "photos"):
        outs = [o for o in outcomes if (o.case.source == "sim") == (source == "sim")]
    else:
        outs = [o for o in outcomes if o.case.source == source]
    pristine = [o for o in outs if o.case.defect is None]
    graded = pristine + [o for o in outs if o.case.defect is not None and o.case.severity >= 1.0]

    per_check: dict[str, dict[str, Any]] = {}
    for name in CHECK_NAMES:
        tp = fp = fn = 0
        for o in graded:
            expected = name in expected_reasons(o.case.defect)
            fired = name in o.reasons
            tp += expected and fired
            fp += fired and not expected
            fn += expected and not fired
        per_check[name] = {
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }

    per_defect: dict[str, dict[str, Any]] = defaultdict(dict)
    groups: dict[tuple[str, float], list[Outcome]] = defaultdict(list)
    for o in outs:
        if o.case.defect is not None and o.case.severity in SEVERITIES:
            groups[(o.case.defect, o.case.severity)].append(o)
    for (defect, sev), group in sorted(groups.items()):
        want = expected_reasons(defect)
        caught = sum(want <= set(o.reasons) for o in group)
        exact = sum(want == set(o.reasons) for o in group)
        per_defect[defect][str(sev)] = {
            "n": len(group),
            "recall": _ratio(caught, len(group)),
            "exact": _ratio(exact, len(group)),
        }

    retakes = [o for o in pristine if o.reasons]
    false_reasons: dict[str, int] = defaultdict(int)
    for o in retakes:
        for r in o.reasons:
            false_reasons[r] += 1

    # Focus monotonicity along the defocus ladder, per (source, seed).
    ladders: dict[tuple[str, int], dict[float, float]] = defaultdict(dict)
    for o in outs:
        if o.case.defect == "defocus" and o.case.severity in FOCUS_LADDER:
            ladders[(o.case.source, o.case.seed)][o.case.severity] = o.scores["focus"]
        if o.case.defect is None and o.case.frame_index == 0:
            ladders[(o.case.source, o.case.seed)][0.0] = o.scores["focus"]
    monotone = pairs = concordant = 0
    complete = [ld for ld in ladders.values() if len(ld) == len(FOCUS_LADDER)]
    for ladder in complete:
        values = [ladder[s] for s in FOCUS_LADDER]
        monotone += all(a > b for a, b in itertools.pairwise(values))
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                pairs += 1
                concordant += values[i] > values[j]

    distributions = {}
    for name in CHECK_NAMES:
        pos = [o.scores[name] for o in graded if name in expected_reasons(o.case.defect)]
        neg = [
            o.scores[name]
            for o in graded
            if name not in expected_reasons(o.case.defect) and name in o.judged
        ]
        distributions[name] = {
            "positives": _quantiles(pos),
            "negatives": _quantiles(neg),
        }

    return {
        "frames": len(outs),
        "pristine_frames": len(pristine),
        "false_retake_rate": _ratio(len(retakes), len(pristine)),
        "false_retake_reasons": dict(false_reasons),
        "per_check": per_check,
        "per_defect": dict(per_defect),
        "focus_monotonic_share": _ratio(monotone, len(complete)),
        "focus_concordant_pairs": _ratio(concordant, pairs),
        "score_quantiles": distributions,
    }


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = np.percentile(np.asarray(values, np.float64), [0, 1, 5, 10, 50, 90, 95, 99, 100])
    keys = ("min", "p1", "p5", "p10", "p50", "p90", "p95", "p99", "max")
    return {k: round(float(v), 4) for k, v in zip(keys, q, strict=True)}


def format_table(summary: dict[str, Any], title: str) -> str:
    lines = [f"== {title}: {summary['frames']} frames =="]
    lines.append(
        f"false retake on pristine: {summary['false_retake_rate']} "
        f"({summary['pristine_frames']} frames; reasons {summary['false_retake_reasons']})"
    )
    lines.append(
        f"focus monotonic with blur: {summary['focus_monotonic_share']} of ladders strictly, "
        f"{summary['focus_concordant_pairs']} of pairs"
    )
    lines.append("")
    lines.append(f"{'check':<14}{'precision':>10}{'recall':>8}{'tp':>6}{'fp':>6}{'fn':>6}")
    for name, m in summary["per_check"].items():
        lines.append(
            f"{name:<14}{_fmt(m['precision']):>10}{_fmt(m['recall']):>8}"
            f"{m['tp']:>6}{m['fp']:>6}{m['fn']:>6}"
        )
    lines.append("")
    header = "".join(f"{'sev ' + str(s):>14}" for s in SEVERITIES)
    lines.append(f"{'defect (recall/exact)':<22}{header}")
    for defect, by_sev in summary["per_defect"].items():
        cells = "".join(
            f"{_fmt(by_sev[str(s)]['recall']) + '/' + _fmt(by_sev[str(s)]['exact']):>14}"
            if str(s) in by_sev
            else f"{'-':>14}"
            for s in SEVERITIES
        )
        lines.append(f"{defect:<22}{cells}")
    lines.append("")
    lines.append("score quantiles (positives p5/p50/p95 | negatives p1/p50/p99):")
    for name, d in summary["score_quantiles"].items():
        pos, neg = d["positives"], d["negatives"]
        p = f"{pos['p5']:.3g}/{pos['p50']:.3g}/{pos['p95']:.3g}" if pos else "-"
        n = f"{neg['p1']:.3g}/{neg['p50']:.3g}/{neg['p99']:.3g}" if neg else "-"
        lines.append(f"  {name:<14}{p:>24} | {n}")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40, help="simulated scenes per defect")
    parser.add_argument("--width", type=int, default=1014)
    parser.add_argument("--height", type=int, default=760)
    parser.add_argument("--photo-seeds", type=int, default=6, help="placements per photograph")
    parser.add_argument("--no-photos", action="store_true", help="simulator frames only")
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "tests" / "data"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args(argv)

    thresholds = Thresholds()
    cases = build_cases(
        args.seeds, args.width, args.height, not args.no_photos, args.photo_seeds, args.data
    )
    outcomes = run_cases(cases, thresholds, args.data, args.workers,
                         progress=sys.stderr.isatty())
    result: dict[str, Any] = {
        "thresholds": thresholds.as_dict(),
        "set": {
            "seeds": args.seeds,
            "size": [args.width, args.height],
            "severities": list(SEVERITIES),
            "photos": [] if args.no_photos else list(PHOTOS),
        },
        "sim": summarise(outcomes, "sim"),
    }
    if not args.no_photos and any(o.case.source != "sim" for o in outcomes):
        result["photos"] = summarise(outcomes, "photos")
        result["per_photo"] = {
            name: summarise(outcomes, name)
            for name in PHOTOS
            if any(o.case.source == name for o in outcomes)
        }
    if not args.json:
        print(format_table(result["sim"], f"simulator {args.width}x{args.height}"))
        if "photos" in result:
            print()
            print(format_table(result["photos"], "real photographs in a simulated lens field"))
            for name, summary in result["per_photo"].items():
                w, h = _PHOTO_SIZE[name]
                checks = ", ".join(
                    f"{c} P/R {_fmt(m['precision'])}/{_fmt(m['recall'])}"
                    for c, m in summary["per_check"].items()
                    if c in ("focus", "motion")
                )
                print(
                    f"  {name} in {w}x{h}: false retake {summary['false_retake_rate']}, "
                    f"focus monotonic {summary['focus_monotonic_share']}; {checks}"
                )
        print()
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
