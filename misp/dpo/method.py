"""A method: the objective's terms and the negatives they need, one object built and checked once.

``misp fit`` builds it from ``model.init_args.method`` (a method file, ``configs/methods/<name>.yaml``,
found by ``misp.methods``); in Python, ``Method.preset("mdpo")`` or ``Method(...)``. Its construction
checks every contradiction between the terms and the negatives and raises one ``MethodError`` listing
them all, before any weights load. Nothing checks it again: the module hands the data its ``negatives``
(source and K) through the handshake (``misp.data.handshake.ModuleValues``), so K has one home, here.

Terms are named by key (the key is the term's ``name``, its ``loss/<name>`` metric), so that a file layered
on a method changes one term without restating the others (``misp.config_layers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from misp.dpo.objective import PreferenceObjective
from misp.dpo.terms import LossTerm, TextDPO
from misp.errors import ConfigError
from misp.negatives.spec import Negatives


class MethodError(ConfigError):
    """A method contradicts itself (``misp`` prints it without a traceback)."""


def _default_terms() -> dict[str, LossTerm | None]:
    return {"text": TextDPO()}


@dataclass
class Method:
    """What a preference run optimises and the negatives it needs.

    Raises:
        MethodError: every contradiction found, one line each.
    """

    beta: float = 0.5
    """KL-penalty strength of every term (0.1 for DPO/mDPO, 0.5 for the multi-negative methods)."""
    terms: dict[str, LossTerm | None] = field(default_factory=_default_terms)
    """The weighted terms summed into the loss, by name, in summation order, e.g. ``{text: TextDPO, image:
    PlackettLuce, anchor: Anchor}`` for mDPO. A term set to null is left out (an overlay's way to drop one)."""
    negatives: Negatives = field(default_factory=Negatives)
    """The negative images the terms read: source and K."""

    def __post_init__(self) -> None:
        # Under jsonargparse a nested dataclass arrives as itself; in Python it may be given as a mapping.
        if isinstance(self.negatives, dict):
            self.negatives = Negatives(**self.negatives)
        problems = method_problems(self)
        if problems:
            raise MethodError("the method contradicts itself:\n  - " + "\n  - ".join(problems))
        # The objective's mathematics (misp.dpo.objective), over the checked terms in their order.
        self.objective = PreferenceObjective(self.beta, [t for t in self.terms.values() if t is not None])

    @classmethod
    def preset(cls, name: str, beta: float | None = None) -> Method:
        """Method file ``configs/methods/<name>.yaml`` (at its beta unless given), built as ``misp fit`` builds it."""
        from misp.methods import method_config

        config = dict(method_config(name).get("model", {}).get("init_args", {}).get("method") or {})
        if beta is not None:
            config["beta"] = beta
        return build_method(config)

    @property
    def uses_proposal(self) -> bool:
        """A learnable q_phi is trained (``ProposalFit``), so the module holds one."""
        return self.objective.uses_proposal


SOURCE_NEEDS = [
    ("needs_ranked_negatives", "ranked", "the negatives in rank order (negatives.source: occlude)"),
    ("needs_paired_responses", "paired_responses", "each negative image's own correct response (response pairs)"),
    ("needs_edit_spans", "edit_spans", "the token spans each edit changes (token_mask: false reads whole responses)"),
    ("needs_in_context", "in_context", "the pairs in a two-image context"),
]
"""(term need, source attribute, what is missing) for the needs a source must answer."""


def method_problems(method: Method) -> list[str]:
    """Each contradiction within ``method`` (its beta, its terms, and its terms against its negatives), as one sentence."""
    from misp.negatives.sources import get_source

    problems = []
    if not method.beta > 0:
        problems.append(f"method.beta must be > 0, got {method.beta}")
    terms = {key: t for key, t in method.terms.items() if t is not None}
    if not terms:
        problems.append("method.terms is empty: name at least one term (e.g. text: {class_path: misp.dpo.terms.TextDPO})")
    for key, term in terms.items():
        if key != term.name:
            problems.append(f"method.terms.{key} is a {type(term).__name__}, whose name is {term.name!r}: key it {term.name!r}")
    source, k = method.negatives.source, method.negatives.k
    try:
        negatives = get_source(source)
    except ValueError as e:
        return problems + [f"method.negatives.source: {e}"]
    if k < 0 or (negatives.draws_negatives and k < 1):
        problems.append(f"method.negatives.k must be >= 1 for source {source!r}, got {k}")
    if not negatives.draws_negatives and k > 0:
        problems.append(f"method.negatives.k={k}, but source {source!r} draws no negatives: set k: 0, or name a source")
    draws = negatives.draws_negatives and k > 0
    needing = [key for key, t in terms.items() if t.needs_negatives]
    if needing and not negatives.draws_negatives:
        problems.append(f"terms {needing} need negative images, but method.negatives.source={source!r} draws none")
    if draws and not needing:
        problems.append(
            f"method.negatives.source={source!r} draws {k} negative image(s) per record that no term uses (each step "
            "would run the model over them for nothing); set source: none, or add an image term "
            "(image: {class_path: misp.dpo.terms.PlackettLuce})"
        )
    for key, term in terms.items():
        problems.extend(f"terms.{key} {term!r}: {p}" for p in term.problems(k if draws else None))
        if term.needs_proposal_log_q and not term.trains_proposal and draws and negatives.proposal == "none":
            problems.append(
                f"terms.{key} {term!r} reweights each draw by its proposal log q, but source {source!r} makes "
                "transforms of the positive with no proposal distribution; use importance_sampling: false, or a source "
                "that draws from a candidate list (sae, random, given, counterfactual)"
            )
        for need, gives, what in SOURCE_NEEDS:
            if getattr(term, need) and draws and not getattr(negatives, gives):
                problems.append(f"terms.{key} {term!r} needs {what}, but source {source!r} gives none")
        if getattr(term, "estimator", "plugin") == "jackknife" and draws and negatives.targets:
            problems.append(
                f"terms.{key} {term!r}: the jackknife leaves one draw out, but source {source!r} draws one negative "
                "from another stratum than the rest, so a leave-one-out estimate is no estimate of the pool's sum; "
                "use estimator: plugin, or source: sae_pairs"
            )
        if term.trains_proposal and draws and negatives.proposal != "learned":
            problems.append(
                f"terms.{key} {term!r} trains the proposal q_phi, but source {source!r} does not draw from it; drop the "
                f"term ({key}: null), or use source: sae"
            )
    return problems


def build_method(config) -> Method:
    """A method from a config's ``method`` mapping (terms as ``{class_path, init_args}``, short class names too),
    built by jsonargparse exactly as ``misp fit`` builds ``MISPDPOModule(method=...)``.

    Raises:
        misp.errors.ConfigError: a mapping that does not parse, or a ``MethodError``.
    """
    from jsonargparse import ArgumentParser

    from misp.config_build import instantiate_config

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=Method)
    try:
        cfg = parser.parse_object({"method": config})
    except Exception as e:  # noqa: BLE001 - jsonargparse's ArgumentError: the mapping itself is malformed
        raise ConfigError(f"method: {e}") from e
    return instantiate_config(parser, cfg).method
