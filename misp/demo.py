"""``make demo``: the whole misp pipeline on the built-in Shapes world, on a CPU, end to end.

world -> contrastive CLIP -> SFT (the base model) -> its evaluation -> SAE -> MISP-DPO -> its evaluation,
then a table of base vs MISP-DPO. Each stage is the same ``misp`` command a user would type. A stage
whose output exists, from the same command and config file contents, is skipped, so an interrupted demo
resumes where it stopped; a stage whose config changed reruns, and so does everything after it. ``--force``
reruns everything and ``--all-methods`` adds every other method with a file in ``configs/methods``
(``misp.methods``: DPO, mDPO, CHiP-style, random multi-negative, CLIP-DPO, ...), trained from the same base.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from misp import methods
from misp.pipeline import Stage, StageRunner

WORLD = Path("worlds/shapes")
RUNS = Path("runs/shapes")
STAMPS = RUNS / ".demo"
"""One file per finished stage, holding the fingerprint of the command and config it ran with."""
MAIN_METHOD = "misp_dpo"


def method_configs(name: str, root: Path = Path(".")) -> list[str]:
    """The flags of a stage: ``--config configs/shapes/<name>.yaml``, or for a preference method (a file in
    ``configs/methods/``, ``misp.methods``) the world's preference base, the method's file, the world's side
    of the method if any (``misp.methods.run_configs``), and its run folder ``runs/shapes/<name>``."""
    if name in methods.method_files(root / "configs"):
        files = methods.run_configs(name, root / "configs/shapes")
        return [a for path in files for a in ("--config", str(path))] + [f"--trainer.default_root_dir={RUNS / name}"]
    return ["--config", str(root / f"configs/shapes/{name}.yaml")]


def baselines() -> list[str]:
    """Every preference method (``misp.methods``) but MISP-DPO, by name."""
    return sorted(name for name in methods.method_files(Path("configs")) if name != MAIN_METHOD)


def own_data_stages(name: str, configs: Path) -> list[Stage]:
    """What a method makes for itself before it trains, by convention beside the stage configs:
    ``<name>_prefs.yaml`` (its own preference pairs, CLIP-DPO) and ``<name>_sae.yaml`` (its own SAE,
    layered on ``sae.yaml``: the mixed-pool MISP-DPO). Their outputs land under ``runs/shapes/``."""
    stages = []
    prefs = configs / f"{name}_prefs.yaml"
    if prefs.exists():
        stages.append(Stage(f"{name}-prefs", ["prefs", "--config", str(prefs)], RUNS / name / "prefs.jsonl"))
    sae = configs / f"{name}_sae.yaml"
    if sae.exists():
        stages.append(Stage(f"{name}-sae", ["fit", "--config", str(configs / "sae.yaml"), "--config", str(sae)],
                            RUNS / f"{name}_sae/export/sae.json"))
    return stages


def method_stages(name: str) -> list[Stage]:
    """Fit a VLM stage, then evaluate its last checkpoint on the test split (after its own data, if any)."""
    root = RUNS / name
    configs = method_configs(name)
    return own_data_stages(name, Path("configs/shapes")) + [
        Stage(name, ["fit", *configs], root / "export"),
        Stage(f"{name}-test", ["test", *configs, "--ckpt_path", str(root / "checkpoints/last.ckpt")],
              root / "test_results.json"),
    ]


def pipeline(all_methods: bool) -> list[Stage]:
    stages = [
        Stage("world", ["world", "--out", str(WORLD)], WORLD / "world.json"),
        Stage("clip", ["fit", "--config", "configs/shapes/clip.yaml"], RUNS / "clip/export"),
        *method_stages("sft"),
        Stage("sae", ["fit", "--config", "configs/shapes/sae.yaml"], RUNS / "sae/export/sae.json"),
        *method_stages(MAIN_METHOD),
    ]
    if all_methods:
        stages += [s for name in baselines() for s in method_stages(name)]
    return stages


RUNNER = StageRunner(stamps=STAMPS)


def is_done(stage: Stage) -> bool:
    """Its output exists and was made by the same command and config as now."""
    return RUNNER.is_done(stage)


def run_stage(stage: Stage, force: bool) -> bool:
    """Run the stage unless it is done (see ``is_done``) and not forced; True when it ran."""
    return RUNNER.run(stage, force)


def summary_table(names: list[str]) -> str:
    """Test results of the named runs side by side (the metrics each run wrote to test_results.json)."""
    labels = methods.labels(Path("configs"))
    rows = [(labels.get(n, n), json.loads(p.read_text())) for n in names if (p := RUNS / n / "test_results.json").exists()]
    if not rows:
        return "(no results)"
    keys = sorted({k for _, r in rows for k in r})
    width = max(len(k) for k in keys)
    lines = [" " * width + "".join(f"{label:>18}" for label, _ in rows)]
    lines += [k.ljust(width) + "".join(f"{r.get(k, float('nan')):>18.3f}" for _, r in rows) for k in keys]
    return "\n".join(lines)


def world_is_stale() -> bool:
    """True when a world exists on disk but this misp would generate a different format of it."""
    from misp.world.generate import MANIFEST, read_manifest

    if not (WORLD / MANIFEST).exists():
        return False
    try:
        read_manifest(WORLD)  # checks the JSON and the version
    except (ValueError, FileNotFoundError):
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rerun stages whose output exists")
    parser.add_argument("--all-methods", action="store_true", help="also train and test every baseline")
    args = parser.parse_args()
    start = time.perf_counter()
    force = args.force
    if not force and world_is_stale():
        # Everything downstream was trained on the old world, so nothing of it may be reused.
        print(f"[demo] {WORLD} was written by another misp version; rerunning every stage", flush=True)
        force = True
    for stage in pipeline(args.all_methods):
        # A stage that ran changed what every later stage reads, so none of their outputs may be reused.
        force = run_stage(stage, force) or force
    print(f"\n[demo] all stages done in {time.perf_counter() - start:.0f} s\n")
    print("Test split: POPE per split (accuracy, F1, yes-ratio...) and CHAIR (lower chair_i/chair_s is better)")
    print(summary_table(["sft", MAIN_METHOD, *baselines()]))


if __name__ == "__main__":
    main()
