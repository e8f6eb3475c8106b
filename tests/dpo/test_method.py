"""One method, one definition: objective terms x negative source x K, checked before anything loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import ImageOps

from misp import methods
from misp.cli import main
from misp.demo import method_configs
from misp.dpo.method import MethodError, check_method, method_problems
from misp.dpo.objective import PreferenceObjective, SequenceLogps, build_objective, preference_loss
from misp.dpo.terms import LossTerm, PlackettLuce, TermInputs, TextDPO
from misp.errors import ConfigError
from misp.losses import anchor_loss, dpo_loss, plackett_luce_loss, proposal_loss
from misp.negatives.sources import REGISTRY, NegativeSource, register_source, transform_draws

ROOT = Path(__file__).resolve().parents[2]


# The table of issue 12: accepted before, now one clear error each (or, for mDPO + crop, a clean run).
@pytest.mark.parametrize(
    ("method", "source", "k", "error"),
    [
        ("dpo", "crop", 2, "no objective term uses"),
        ("misp_dpo", "crop", 2, "no proposal distribution"),
        ("misp_dpo", "random", 2, "does not draw from it"),
        ("mdpo", "none", 1, "need negative images"),
        ("mdpo", "crop", 0, "need negative images"),
        ("mdpo", "crop", 2, None),
        ("misp_dpo", "sae", 3, None),
        ("dpo", "none", 1, None),
    ],
)
def test_method_check(method, source, k, error):
    objective = PreferenceObjective.preset(method)
    if error is None:
        check_method(objective, source, k)
    else:
        with pytest.raises(MethodError, match=error):
            check_method(objective, source, k)


def test_every_contradiction_is_reported_once():
    problems = method_problems(PreferenceObjective.preset("misp_dpo"), "crop", 2)
    assert len(problems) == 2  # IS over transforms, and a proposal nothing draws from
    assert sum("importance_sampling" in p for p in problems) == 1


def test_the_cli_refuses_a_contradictory_method_before_loading_anything(tmp_path, capsys):
    # A VLM path that does not exist: had the model been loaded first, this would be a FileNotFoundError.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *method_configs("dpo", ROOT), "--data.source=crop", "--data.k=2",
              f"--model.init_args.vlm.path={tmp_path / 'missing'}", f"--data.records_file={tmp_path / 'missing.jsonl'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "misp: error: the method contradicts itself" in err and "data.source='crop' draws 2" in err
    assert "Traceback" not in err


def _fixed_batch(b: int = 4, k: int = 3) -> tuple[SequenceLogps, SequenceLogps, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def logps() -> SequenceLogps:
        return SequenceLogps(-20 - 5 * torch.rand(b, generator=g), -22 - 5 * torch.rand(b, generator=g),
                             -21 - 5 * torch.rand(b, k, generator=g))

    log_q = torch.log_softmax(torch.randn(b, k, generator=g), dim=-1)
    return logps(), logps(), log_q


def _old_loss(method: str, policy, reference, log_q, log_q_phi, beta: float) -> torch.Tensor:
    """The loss of the configs before terms existed (objective.loss dpo/mdpo/misp with their flags)."""
    p, r = policy, reference
    text = dpo_loss(p.chosen, p.rejected, r.chosen, r.rejected, beta)[0]
    if method == "dpo":
        return text.mean()
    if method in ("mdpo", "chip", "random_neg"):
        total = text + plackett_luce_loss(p.chosen, p.negatives, r.chosen, r.negatives, beta)
        if method == "mdpo":
            total = total + anchor_loss(p.chosen, r.chosen, beta)
        return total.mean()
    image = plackett_luce_loss(p.chosen, p.negatives, r.chosen, r.negatives, beta, log_q=log_q)
    a = beta * ((p.negatives - r.negatives) - (p.chosen - r.chosen).unsqueeze(-1))
    return (1.0 * text + image).mean() + proposal_loss(a, log_q, log_q_phi).mean()


@pytest.mark.parametrize("method", ["dpo", "mdpo", "chip", "random_neg", "misp_dpo"])
def test_presets_reproduce_the_old_objectives(method):
    policy, reference, log_q = _fixed_batch()
    log_q_phi = log_q + 0.1
    objective = PreferenceObjective.preset(method)
    got, _ = preference_loss(objective, policy, reference, log_q, log_q_phi)
    want = _old_loss(method, policy, reference, log_q, log_q_phi, objective.beta)
    assert abs(float(got) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))


@pytest.mark.parametrize("method", sorted(methods.method_files()), ids=str)
def test_each_method_file_builds_and_is_consistent(method):
    """Every file under configs/*/methods/ is a method: its objective builds, and agrees with its negatives."""
    config = methods.method_config(method)
    objective = PreferenceObjective.preset(method)
    assert objective.beta == config["model"]["init_args"]["objective"]["beta"]
    assert len(objective.terms) == len(config["model"]["init_args"]["objective"]["terms"])
    data = yaml.safe_load(methods.preference_base(method).read_text())["data"]["init_args"] | config["data"]["init_args"]
    check_method(objective, data["source"], data.get("k", 3))
    assert methods.labels()[method] and methods.preference_base(method).exists()


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(methods.UnknownMethod, match="misp_dpo"):
        PreferenceObjective.preset("no_such_method")


def test_the_objective_has_one_builder_and_it_takes_short_class_names():
    """What `misp fit` accepts, the pre-check accepts (the old second builder failed on `class_path: TextDPO`)."""
    built = build_objective({"beta": 0.1, "terms": [{"class_path": "TextDPO"}, {"class_path": "PlackettLuce"}]})
    assert [type(t).__name__ for t in built.terms] == ["TextDPO", "PlackettLuce"] and built.beta == 0.1
    with pytest.raises(ConfigError, match="beta must be > 0"):
        build_objective({"beta": 0.0})


def test_the_cli_pre_check_accepts_short_term_names(tmp_path, capsys):
    extra = tmp_path / "short.yaml"
    extra.write_text(yaml.safe_dump({"model": {"init_args": {"objective": {"terms": [{"class_path": "TextDPO"}]}}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *method_configs("dpo", ROOT), "--config", str(extra), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "misp.dpo.terms.TextDPO" in capsys.readouterr().out


# Extending misp from a test file alone: a negative source and a loss term, registered and configured.
class ImageHinge(LossTerm):
    """A toy image term: a hinge on the hardest negative's advantage."""

    name = "hinge"
    needs_negatives = True

    def __init__(self, weight: float = 1.0, margin: float = 1.0) -> None:
        super().__init__(weight)
        self.margin = margin

    def __call__(self, x: TermInputs):
        hardest = x.advantages.max(dim=1).values
        return F.relu(self.margin + hardest), {"hinge/active": (hardest > -self.margin).float().mean()}


register_source(NegativeSource(
    "mirror", lambda c, epoch: transform_draws("mirror", c.k, c.seed, epoch, c.ids), proposal="none",
    materialise=lambda ref, positive, loader: ImageOps.mirror(loader(positive)),
))


def test_a_source_and_a_term_added_from_a_test_file_fit_a_step(tiny_world, vlm_dir, tmp_path, monkeypatch):
    assert "mirror" in REGISTRY
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "toy.yaml"
    extra.write_text(yaml.safe_dump({
        "model": {"init_args": {"objective": {"beta": 0.1, "terms": [
            {"class_path": "misp.dpo.terms.TextDPO"},
            {"class_path": f"{__name__}.ImageHinge", "init_args": {"margin": 0.5}},
        ]}}},
        "data": {"init_args": {"source": "mirror", "k": 1}},
    }))
    main(["fit", *method_configs("dpo", ROOT), "--config", str(extra),
          f"--model.init_args.vlm.path={vlm_dir}", f"--data.records_file={tiny_world / 'pref.jsonl'}",
          f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
          f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}",
          f"--data.validation.pope_file={tiny_world / 'val_pope.jsonl'}",
          f"--data.validation.captions_file={tiny_world / 'val.jsonl'}",
          "--trainer.max_steps=1", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=4",
          "--data.progress=false", "--data.preview_records=0"])
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "runs").rglob("metrics.csv")))))
    names = {k for r in rows for k, v in r.items() if v}
    assert {"loss/hinge", "hinge/active", "loss/text"} <= names and "loss/image" not in names
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))


def test_a_term_declares_what_it_needs():
    assert PlackettLuce(importance_sampling=True).needs_proposal_log_q
    assert not PlackettLuce().needs_proposal_log_q and not TextDPO().needs_negatives
    with pytest.raises(ValueError, match="more than once"):
        PreferenceObjective(terms=[TextDPO(), TextDPO(weight=2.0)])
    with pytest.raises(ValueError, match="weight must be > 0"):
        TextDPO(weight=0.0)
