"""One check of a method: the objective's terms against the data's negatives, before anything loads.

``misp fit`` runs it on the parsed config (``MispCLI.before_instantiate_classes``), so a contradiction costs
a second, not a model load and a mining pass; ``MISPDPOModule.on_fit_start`` runs it again for runs built
in Python. Every contradiction found is reported, one line each.
"""

from __future__ import annotations

from misp.dpo.objective import PreferenceObjective
from misp.errors import ConfigError
from misp.negatives.sources import get_source


class MethodError(ConfigError):
    """The objective and the data's negatives contradict each other (``misp`` prints it without a traceback)."""


SOURCE_NEEDS = [
    ("needs_ranked_negatives", "ranked", "the negatives in rank order (data.source: occlude)"),
    ("needs_paired_responses", "paired_responses", "each negative image's own correct response (response pairs)"),
    ("needs_edit_spans", "edit_spans", "the token spans each edit changes (token_mask: false reads whole responses)"),
    ("needs_in_context", "in_context", "the pairs in a two-image context"),
]
"""(term need, source attribute, what is missing) for the needs a source must answer."""


def method_problems(objective: PreferenceObjective, source: str, k: int) -> list[str]:
    """Each contradiction between ``objective``'s terms and ``data.source`` / ``data.k``, as one sentence."""
    negatives = get_source(source)
    draws = negatives.draws_negatives and k > 0
    problems = []
    needing = [repr(t) for t in objective.terms if t.needs_negatives]
    if needing and not draws:
        why = f"data.source={source!r}" + ("" if negatives.draws_negatives else " draws none") + (f" with data.k={k}" if negatives.draws_negatives else "")
        problems.append(f"objective terms {needing} need negative images, but {why}")
    if draws and not needing:
        problems.append(
            f"data.source={source!r} draws {k} negative image(s) per record that no objective term uses (each "
            "step would run the model over them for nothing); set data.source: none, or add an image term "
            "(misp.dpo.terms.PlackettLuce)"
        )
    for term in objective.terms:
        if term.needs_proposal_log_q and not term.trains_proposal and draws and negatives.proposal == "none":
            problems.append(
                f"{term!r} reweights each draw by its proposal log q, but data.source={source!r} makes transforms of "
                "the positive with no proposal distribution; use importance_sampling: false, or a source that draws "
                "from a candidate list (sae, random, given, counterfactual)"
            )
        for need, gives, what in SOURCE_NEEDS:
            if getattr(term, need) and draws and not getattr(negatives, gives):
                problems.append(f"{term!r} needs {what}, but data.source={source!r} gives none")
        if term.trains_proposal and draws and negatives.proposal != "learned":
            problems.append(
                f"{term!r} trains the proposal q_phi, but data.source={source!r} does not draw from it; remove the "
                "term, or use data.source: sae"
            )
    return problems


def check_method(objective: PreferenceObjective, source: str, k: int) -> None:
    """Raise ``MethodError`` listing every contradiction (nothing when the method is consistent)."""
    problems = method_problems(objective, source, k)
    if problems:
        raise MethodError("the method contradicts itself:\n  - " + "\n  - ".join(problems))
