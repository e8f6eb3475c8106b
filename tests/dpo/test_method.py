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
from misp.dpo.method import Method, MethodError, build_method
from misp.dpo.objective import PreferenceObjective, SequenceLogps, preference_loss
from misp.dpo.terms import LossTerm, PlackettLuce, ProposalFit, TermInputs, TextDPO
from misp.errors import ConfigError
from misp.losses import anchor_loss, dpo_loss, plackett_luce_loss, proposal_loss
from misp.negatives.sources import REGISTRY, NegativeSource, register_source, transform_draws
from misp.negatives.spec import Negatives

ROOT = Path(__file__).resolve().parents[2]


def _method(name: str, source: str, k: int) -> Method:
    preset = Method.preset(name)
    return Method(preset.beta, preset.terms, Negatives(source, k))


# The table of issue 12: accepted before, now one clear error each (or, for mDPO + crop, a clean run).
@pytest.mark.parametrize(
    ("method", "source", "k", "error"),
    [
        ("dpo", "crop", 2, "no term uses"),
        ("misp_dpo", "crop", 2, "no proposal distribution"),
        ("misp_dpo", "random", 2, "does not draw from it"),
        ("mdpo", "none", 0, "need negative images"),
        ("mdpo", "crop", 0, "k must be >= 1"),
        ("dpo", "none", 1, "draws no negatives"),
        ("mdpo", "crop", 2, None),
        ("misp_dpo", "sae", 3, None),
        ("dpo", "none", 0, None),
    ],
)
def test_method_check(method, source, k, error):
    if error is None:
        assert _method(method, source, k).negatives == Negatives(source, k)
    else:
        with pytest.raises(MethodError, match=error):
            _method(method, source, k)


def test_every_contradiction_is_reported_together_once():
    with pytest.raises(MethodError) as info:
        Method(0.0, {"txt": TextDPO(), "proposal": ProposalFit(),
                     "image": PlackettLuce(importance_sampling=True)}, Negatives("crop", 2))
    problems = str(info.value).splitlines()[1:]
    assert len(problems) == 4, problems  # beta, a key that is not the term's name, IS over transforms, q_phi not drawn
    assert sum("importance_sampling" in p for p in problems) == 1 and any("key it 'text'" in p for p in problems)
    assert isinstance(info.value, ConfigError)


def test_the_cli_refuses_a_contradictory_method_before_loading_anything(tmp_path, capsys):
    # A VLM path that does not exist: had the model been loaded first, this would be a FileNotFoundError.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *method_configs("dpo", ROOT), "--model.init_args.method.negatives.source=crop",
              "--model.init_args.method.negatives.k=2",
              f"--model.init_args.vlm.path={tmp_path / 'missing'}", f"--data.records_file={tmp_path / 'missing.jsonl'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "misp: error: the method contradicts itself" in err and "source='crop' draws 2" in err
    assert "Traceback" not in err


def test_the_data_has_no_k_of_its_own(tmp_path, capsys):
    """K has one home, the method: a data-side K is refused, not silently used or ignored."""
    for option in ("--data.init_args.k=2", "--data.k=2", "--data.source=crop"):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *method_configs("mdpo", ROOT), option, "--print_config"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"misp: error: {option.split('=')[0]} is the method's now: use --model.init_args.method"), err
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  init_args:\n    source: crop\n    k: 1\n")
    with pytest.raises(SystemExit):
        main(["fit", *method_configs("mdpo", ROOT), "--config", str(old), "--print_config"])
    assert f"--config {old}: data.init_args.source is the method's now" in capsys.readouterr().err


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
def test_each_method_file_is_method_only_builds_and_is_consistent(method):
    """Every file under configs/methods/ is a method and nothing else: its terms, beta and negatives."""
    config = methods.method_config(method)
    assert set(config) == {"model"} and set(config["model"]) == {"init_args"}
    assert set(config["model"]["init_args"]) == {"method"}
    built = Method.preset(method)
    said = config["model"]["init_args"]["method"]
    assert built.beta == said["beta"] and list(built.terms) == list(said["terms"])
    assert built.negatives == Negatives(**said["negatives"])
    assert methods.labels()[method]


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(methods.UnknownMethod, match="misp_dpo"):
        Method.preset("no_such_method")


def test_the_method_has_one_builder_and_it_takes_short_class_names():
    built = build_method({"beta": 0.1, "terms": {"text": {"class_path": "TextDPO"}, "image": {"class_path": "PlackettLuce"}},
                          "negatives": {"source": "crop", "k": 1}})
    assert [type(t).__name__ for t in built.objective.terms] == ["TextDPO", "PlackettLuce"] and built.beta == 0.1
    with pytest.raises(MethodError, match="beta must be > 0"):
        build_method({"beta": 0.0})


def test_short_term_names_work_in_a_layered_file(tmp_path, capsys):
    extra = tmp_path / "short.yaml"
    extra.write_text(yaml.safe_dump({"model": {"init_args": {"method": {"terms": {"text": {"class_path": "TextDPO",
                                                                                            "init_args": {"weight": 2.0}}}}}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *method_configs("dpo", ROOT), "--config", str(extra), "--print_config"])
    assert exit_info.value.code in (0, None)
    terms = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["method"]["terms"]
    assert terms == {"text": {"class_path": "misp.dpo.terms.TextDPO", "init_args": {"weight": 2.0}}}


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
    extra.write_text(yaml.safe_dump({"model": {"init_args": {"method": {
        "beta": 0.1,
        "terms": {"hinge": {"class_path": f"{__name__}.ImageHinge", "init_args": {"margin": 0.5}}},
        "negatives": {"source": "mirror", "k": 1},
    }}}}))
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
