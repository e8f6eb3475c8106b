"""Do two commits train the same numbers? Short smoke fits of DPO, mDPO and MISP-DPO on each, compared bitwise.

    python -m bench.same_numbers --baseline e764199 [--methods dpo,mdpo,misp_dpo]   (from the repository root)
    python -m bench.same_numbers --baseline 41a965e --this-args=--model.init_args.prefix_sharing=false

``--this-args`` adds CLI arguments to this checkout's fits only (a switch the baseline does not know). When
rows differ, the largest relative difference of a step loss is printed, to judge float noise from a change.

Each tree (this checkout, and ``git archive`` of the baseline into a temporary folder) runs in its own
process on the same tiny stand-ins (``misp.smoke``: world, CLIP, SAE, VLM, built once by this tree):
4 steps over 2 epochs (so the second epoch redraws negatives and reuses cached reference log-probs),
batch 4. Every step's loss and a hash of the last checkpoint's weights are compared: a refactor that
claims to change no number must pass with every row equal. Exit status 1 when a row differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fit(tree: Path, art: Path, methods: list[str], out: Path, extra: list[str] = ()) -> None:
    """In this process (PYTHONPATH=tree): fit each method and write its step losses and weights hash."""
    import torch

    torch.set_num_threads(1)
    import misp.dpo.module as module
    from misp.cli import main
    from misp.demo import method_configs

    losses: list[float] = []
    step = module.MISPDPOModule.training_step

    def recorded(self, batch, i):
        loss = step(self, batch, i)
        losses.append(float(loss.detach()))
        return loss

    module.MISPDPOModule.training_step = recorded
    world, result = art / "world", {}
    for method in methods:
        losses.clear()
        run = out.parent / f"{out.stem}-{method}"
        run.mkdir(parents=True)
        os.chdir(run)
        args = ["fit", *method_configs(method, tree), f"--model.init_args.vlm.path={art / 'vlm'}",
                f"--data.records_file={world / 'pref.jsonl'}",
                f"--data.evaluation.pope_file={world / 'pope.jsonl'}", f"--data.evaluation.captions_file={world / 'test.jsonl'}",
                f"--data.validation.pope_file={world / 'val_pope.jsonl'}", f"--data.validation.captions_file={world / 'val.jsonl'}",
                "--trainer.max_steps=4", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--data.batch_size=4", "--data.progress=false", "--data.preview_records=0", *extra]
        if method.startswith("misp"):
            args += [f"--data.pool={world / 'pool.jsonl'}", f"--data.clip.checkpoint={art / 'clip'}",
                     f"--data.sae_path={art / 'sae'}", "--data.mining.n_candidates=8", "--data.mining.pool_size=4",
                     "--data.mining.dup_threshold=0.99999"]
        main(args)
        state = torch.load(next(run.rglob("last.ckpt")), weights_only=False)["state_dict"]
        digest = hashlib.sha256()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].float().cpu().numpy().tobytes())
        result[method] = {"losses": [x.hex() for x in losses], "weights": digest.hexdigest()}
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare this checkout with")
    parser.add_argument("--methods", default="dpo,mdpo,misp_dpo", help="method files to fit, comma-separated")
    parser.add_argument("--this-args", default="", help="extra CLI arguments for this checkout's fits (shell-split)")
    parser.add_argument("--_fit", nargs=3, help=argparse.SUPPRESS)  # tree, artifacts, output (the child's side)
    args = parser.parse_args()
    methods = args.methods.split(",")
    if args._fit:
        _fit(Path(args._fit[0]), Path(args._fit[1]), methods, Path(args._fit[2]), shlex.split(args.this_args))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        from misp.smoke import smoke_clip, smoke_sae, smoke_vlm, smoke_world

        art = work / "art"
        world = smoke_world(art / "world")
        smoke_sae(smoke_clip(art / "clip"), art / "sae")
        smoke_vlm(world, art / "vlm")
        results = {}
        for name, tree in (("baseline", base), ("this", ROOT)):
            env = os.environ | {"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                "WANDB_MODE": "offline"}
            out = work / f"{name}.json"
            # As a script, so that `misp` (and nothing else) comes from the tree under test.
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--baseline", args.baseline, "--methods",
                            args.methods, f"--this-args={args.this_args if name == 'this' else ''}",
                            "--_fit", str(tree), str(art), str(out)], env=env,
                           check=True, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[name] = json.loads(out.read_text())
    same = True
    for method in methods:
        a, b = results["baseline"][method], results["this"][method]
        equal = a == b
        same &= equal
        losses = ", ".join(f"{float.fromhex(x):.9g}" for x in a["losses"])
        worst = max((abs(float.fromhex(x) - float.fromhex(y)) / max(abs(float.fromhex(x)), 1e-30)
                     for x, y in zip(a["losses"], b["losses"], strict=True)), default=0.0)
        print(f"{method:10s} {'same' if equal else 'DIFFERENT':9s} losses [{losses}] weights {a['weights'][:12]}"
              + ("" if equal else f" vs [{', '.join(f'{float.fromhex(x):.9g}' for x in b['losses'])}] {b['weights'][:12]}"
                 f" (largest relative loss difference {worst:.2e})"))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
