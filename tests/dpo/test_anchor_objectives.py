"""The anchors' objectives (SymMPO, IC-VCO, LPOI) against transcriptions of their released code on a fixed
batch, their limiting cases, and CW-DPO's cooling weight on image terms.

Each ``released_*`` function below is the released loss written the way its repository writes it (names,
order of operations, reductions), on plain tensors instead of a trainer:
- SymMPO: Liuwq-bit/SymMPO muffin/train/trainers.py ``dpo_loss``;
- IC-VCO: OPPO-Mente-Lab/IC-VCO src/icvco/trainers/vco_trainer.py ``run_single_image_preference``,
  ``run_multi_image_preference``, ``soft_label_preference_loss``, ``anchor_loss``, ``get_batch_loss_metrics``;
- LPOI: fatemehpesaran310/lpoi lpoi_dpo_trainer_5img.py ``dpo_pl5_loss`` and ``get_batch_loss_metrics``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from misp.dpo.method import Method, MethodError, build_method
from misp.dpo.objective import PreferenceObjective, preference_loss
from misp.dpo.terms import (
    Anchor,
    CellTokenLogps,
    Cooling,
    EditSpans,
    ImageRanking,
    InContextPairs,
    PairAnchors,
    PairedLogps,
    PairedResponses,
    PairMargin,
    PlackettLuce,
    ResponseCells,
    ResponsePairs,
    SequenceLogps,
    TermInputs,
    TextDPO,
    VCDist,
    sum_terms,
    weighted_term_losses,
)
from misp.losses import anchor_loss, dpo_loss, image_advantages, ranking_loss
from misp.negatives.spec import Negatives

B = 6


def logps(*shape: int) -> torch.Tensor:
    """Summed log-probs of a plausible size (tens of nats), so beta * differences span the sigmoid."""
    return -20 + 8 * torch.randn(*shape, dtype=torch.float32)


def total(terms, inputs: TermInputs) -> torch.Tensor:
    losses, _ = weighted_term_losses(terms, inputs)
    return sum_terms(losses).mean()


# --- SymMPO -------------------------------------------------------------------------------------------


def released_symmpo(policy_logps: dict, reference_logps: dict, beta_1, beta_2, lamda, margin=0.0001):
    """Liuwq-bit/SymMPO ``dpo_loss`` (its regular-term coefficient 0.0001 made an argument for the limit)."""
    pi_logratios = policy_logps['policy_logp_1_w'] - policy_logps['policy_logp_1_l']
    ref_logratios = reference_logps['ref_logp_1_w'] - reference_logps['ref_logp_1_l']
    logits = pi_logratios - ref_logratios
    losses = -F.logsigmoid(beta_1 * logits)
    pi_logratios_1 = policy_logps['policy_logp_1_w'] - policy_logps['policy_logp_1_2']
    pi_logratios_2 = policy_logps['policy_logp_2_2'] - policy_logps['policy_logp_2_w']
    ref_logratios_1 = reference_logps['ref_logp_1_w'] - reference_logps['ref_logp_1_2']
    ref_logratios_2 = reference_logps['ref_logp_2_2'] - reference_logps['ref_logp_2_w']
    logits_1 = pi_logratios_1 - ref_logratios_1
    logits_2 = pi_logratios_2 - ref_logratios_2
    losses += lamda * (-F.logsigmoid(beta_1 * logits_1) - F.logsigmoid(beta_1 * logits_2))
    sft_logits_1 = policy_logps['policy_logp_1_w'] - reference_logps['ref_logp_1_w']
    sft_logits_2 = policy_logps['policy_logp_2_2'] - reference_logps['ref_logp_2_2']
    losses += -F.logsigmoid(beta_1 * sft_logits_1)
    losses += -F.logsigmoid(beta_2 * sft_logits_2)
    losses += margin * torch.pow(logits_1 - logits_2, 2)
    return losses


def symmpo_batch(seed: int = 0):
    """Released names -> tensors (image 1 = m_p, image 2 = the edit m', w/l = y_w/y_l, 2 = y'_w), and the same
    log-probs as misp's TermInputs (K = 1 edit per example)."""
    torch.manual_seed(seed)
    keys = ["1_w", "1_l", "1_2", "2_w", "2_2"]
    pol = {f"policy_logp_{k}": logps(B).requires_grad_() for k in keys}
    ref = {f"ref_logp_{k}": logps(B) for k in keys}

    def seq(d, prefix):
        return SequenceLogps(d[f"{prefix}_1_w"], d[f"{prefix}_1_l"], d[f"{prefix}_2_w"].unsqueeze(-1))

    def paired(d, prefix):
        return PairedLogps(own=d[f"{prefix}_2_2"].unsqueeze(-1), swapped=d[f"{prefix}_1_2"].unsqueeze(-1))

    inputs = TermInputs(seq(pol, "policy_logp"), seq(ref, "ref_logp"), 0.1,
                        paired=PairedResponses(paired(pol, "policy_logp"), paired(ref, "ref_logp")))
    return pol, ref, inputs


def test_symmpo_matches_its_released_loss_in_value_and_gradient():
    pol, ref, inputs = symmpo_batch()
    terms = [TextDPO(), ResponsePairs(weight=0.5), PairMargin(weight=1e-4), PairAnchors()]
    ours = total(terms, inputs)
    theirs = released_symmpo(pol, ref, 0.1, 0.1, 0.5).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    g_ours = torch.autograd.grad(ours, list(pol.values()))
    g_theirs = torch.autograd.grad(theirs, list(pol.values()))
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_symmpo_without_pairs_and_margin_is_dpo_plus_both_anchors():
    pol, ref, inputs = symmpo_batch(1)
    theirs = released_symmpo(pol, ref, 0.1, 0.1, lamda=0.0, margin=0.0)
    expected = (dpo_loss(pol["policy_logp_1_w"], pol["policy_logp_1_l"], ref["ref_logp_1_w"], ref["ref_logp_1_l"], 0.1)[0]
                + anchor_loss(pol["policy_logp_1_w"], ref["ref_logp_1_w"], 0.1)
                + anchor_loss(pol["policy_logp_2_2"], ref["ref_logp_2_2"], 0.1))
    torch.testing.assert_close(theirs, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total([TextDPO(), PairAnchors()], inputs), expected.mean(), rtol=1e-6, atol=1e-6)
    # PairAnchors on the single-image cells is mDPO's Anchor plus the same anchor on (m', y'_w)
    both = weighted_term_losses([Anchor(), PairAnchors()], inputs)[0]
    torch.testing.assert_close(both["pair_anchors"] - both["anchor"],
                               anchor_loss(pol["policy_logp_2_2"], ref["ref_logp_2_2"], 0.1))


def test_the_response_pairs_do_not_see_a_per_image_offset_that_the_image_term_does():
    """Adding a constant c(m) to every log-prob under image m (a partition-function offset) leaves each pair
    unchanged, while the single-response image advantage a_i moves by beta * c."""
    pol, ref, inputs = symmpo_batch(2)

    def advantages(x: TermInputs) -> torch.Tensor:
        return image_advantages(x.policy.chosen, x.policy.negatives, x.reference.chosen, x.reference.negatives, x.beta)

    inputs.advantages = advantages(inputs)
    before = weighted_term_losses([ResponsePairs(), PlackettLuce()], inputs)[0]
    c = 7.0
    shifted = TermInputs(
        SequenceLogps(inputs.policy.chosen, inputs.policy.rejected, inputs.policy.negatives + c),
        inputs.reference, 0.1,
        paired=PairedResponses(PairedLogps(inputs.paired.policy.own + c, inputs.paired.policy.swapped), inputs.paired.reference),
    )
    shifted.advantages = advantages(shifted)
    after = weighted_term_losses([ResponsePairs(), PlackettLuce()], shifted)[0]
    torch.testing.assert_close(after["pairs"], before["pairs"])
    assert (after["image"] > before["image"]).all()


# --- IC-VCO -------------------------------------------------------------------------------------------


def trl_sigmoid_dpo(beta, chosen, rejected, ref_chosen, ref_rejected):
    """TRL DPOTrainer.dpo_loss, loss_type sigmoid, label_smoothing 0 (what VCOTrainer.dpo_loss runs)."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(beta * logits)


def released_icvco(single_pol, single_ref, multi_pol, multi_ref, beta=0.1, single_weight=1.75, multi_weight=0.75,
                   single_anchor_weight=1.75, multi_anchor_weight=0.75, vcdist_weight=0.4, threshold=0.5):
    """IC-VCO's ``get_batch_loss_metrics`` on the per-branch log-prob packs of its forwards.

    ``single_*`` / ``multi_*`` are the forwards' outputs on the 4B rows [(c1, resp1), (c2, resp2), (c1, resp2),
    (c2, resp1)], i.e. ``chosen_logps`` = first 2B rows and ``rejected_logps`` = last 2B (single: summed over
    the token-masked span, as ``forward_with_pre_concatenated_batch`` does with ``completion_token_mask``)."""
    def branch(pol, ref):
        losses = trl_sigmoid_dpo(beta, pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"])
        anchor = -F.logsigmoid(beta * (pol["chosen"] - ref["chosen"]) - 0.0)
        return losses.mean(), anchor.mean()

    s_base, s_anchor = branch(single_pol, single_ref)
    m_base, m_anchor = branch(multi_pol, multi_ref)
    # soft_label_preference_loss (vcdist_stopgrad, vcdist_filter, temperature 1)
    student_logits = (single_pol["chosen"] - single_pol["rejected"]) - (single_ref["chosen"] - single_ref["rejected"])
    student_margin = beta * student_logits
    with torch.no_grad():
        teacher_logits = (multi_pol["chosen"] - multi_pol["rejected"]) - (multi_ref["chosen"] - multi_ref["rejected"])
        target_probs = torch.sigmoid(beta * (teacher_logits / 1.0))
    student_probs = torch.sigmoid(student_margin)
    raw_loss = F.binary_cross_entropy(student_probs, target_probs, reduction='none')
    correctness_mask = (target_probs > threshold).float()
    confidence_mask = (student_probs < target_probs).float()
    active_mask = confidence_mask * correctness_mask
    filtered_loss = raw_loss * active_mask
    num_valid = active_mask.sum()
    vcdist = filtered_loss.sum() / num_valid if num_valid > 0 else torch.tensor(0.0, requires_grad=True)
    single_total = single_weight * s_base + single_anchor_weight * s_anchor + vcdist_weight * vcdist
    multi_total = multi_weight * m_base + multi_anchor_weight * m_anchor
    return torch.stack([single_total, multi_total]).mean(), num_valid


def icvco_batch(seed: int = 0, teacher_sign: float = 0.0):
    """A fixed batch: per-token log-probs and span masks of the four single-image cells, the in-context cells,
    for policy and reference (K = 1 edit per example: image 1 = m_p with resp 1 = y_p, image 2 = the edit)."""
    torch.manual_seed(seed)
    t_p, t_e = 9, 7

    def tokens():
        return CellTokenLogps(
            chosen=-2 * torch.rand(B, t_p), chosen_edit=-2 * torch.rand(B, 1, t_p),
            own=-2 * torch.rand(B, 1, t_e), swapped=-2 * torch.rand(B, 1, t_e),
        )

    pol, ref = tokens(), tokens()
    for t in (pol.chosen, pol.chosen_edit, pol.own, pol.swapped):
        t.requires_grad_()
    chosen_mask = torch.rand(B, 1, t_p) < 0.4
    own_mask = torch.rand(B, 1, t_e) < 0.4
    chosen_mask[:, :, 0] = own_mask[:, :, 0] = True  # every response has an edited span

    def cells(shift=0.0):
        return ResponseCells(logps(B, 1) + shift, logps(B, 1), logps(B, 1) + shift, logps(B, 1))

    ic_pol, ic_ref = cells(teacher_sign * 100), cells()
    for t in (ic_pol.chosen, ic_pol.own):
        t.requires_grad_()
    spans = EditSpans(pol, ref, chosen_mask, own_mask)
    inputs = TermInputs(SequenceLogps(logps(B), logps(B), logps(B, 1)), SequenceLogps(logps(B), logps(B), logps(B, 1)),
                        0.1, spans=spans, in_context=InContextPairs(ic_pol, ic_ref))

    def masked(x, m):  # forward_with_pre_concatenated_batch: per_token_logps[~loss_mask] = 0; sum(-1)
        x = x.clone()
        x[~m] = 0
        return x.sum(-1)

    def single_pack(t: CellTokenLogps):
        # rows (m_p, y_p), (m', y'), | (m_p, y'), (m', y_p); masks [resp1, resp2, resp2, resp1]
        chosen = torch.cat([masked(t.chosen, chosen_mask[:, 0]), masked(t.own[:, 0], own_mask[:, 0])])
        rejected = torch.cat([masked(t.swapped[:, 0], own_mask[:, 0]), masked(t.chosen_edit[:, 0], chosen_mask[:, 0])])
        return {"chosen": chosen, "rejected": rejected}

    def multi_pack(c: ResponseCells):
        return {"chosen": torch.cat([c.chosen[:, 0], c.own[:, 0]]), "rejected": torch.cat([c.swapped[:, 0], c.chosen_edit[:, 0]])}

    packs = (single_pack(pol), single_pack(ref), multi_pack(ic_pol), multi_pack(ic_ref))
    return inputs, packs, [pol.chosen, pol.chosen_edit, pol.own, pol.swapped, ic_pol.chosen, ic_pol.own]


def icvco_terms():
    """IC-VCO's defaults as misp terms. The release averages each branch's pair losses over its 2B pairs and the
    two branch totals with each other, where ResponsePairs and PairAnchors sum an example's two pairs: so
    each weight is the release's / 4 (VCDist's, already a batch mean, / 2)."""
    return [
        ResponsePairs(weight=1.75 / 4, token_mask=True), PairAnchors(weight=1.75 / 4, token_mask=True),
        ResponsePairs(weight=0.75 / 4, context="in_context"), PairAnchors(weight=0.75 / 4, context="in_context"),
        VCDist(weight=0.4 / 2),
    ]


@pytest.mark.parametrize("teacher_sign", [1.0, 0.0])
def test_icvco_matches_its_released_loss_in_value_and_gradient(teacher_sign):
    inputs, packs, leaves = icvco_batch(3, teacher_sign)
    ours = total(icvco_terms(), inputs)
    theirs, num_active = released_icvco(*packs)
    if teacher_sign:
        assert num_active > 0  # the in-context teacher is right on every pair, so VCDist is active
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    g_ours = torch.autograd.grad(ours, leaves)
    g_theirs = torch.autograd.grad(theirs, leaves)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_vcdist_is_silent_where_the_in_context_teacher_is_wrong():
    inputs, _, leaves = icvco_batch(4, teacher_sign=-1.0)  # the teacher prefers the wrong response everywhere
    losses, metrics = VCDist()(inputs)
    assert float(metrics["vcdist/active_rate"]) == 0.0
    assert torch.equal(losses, torch.zeros(B))


def test_the_token_mask_reads_only_the_edited_span():
    """Changing a token's log-prob outside the span changes nothing in the masked pairs; inside, it does."""
    inputs, _, _ = icvco_batch(5)
    term = ResponsePairs(token_mask=True)
    before = term(inputs)[0].detach()
    sp = inputs.spans
    outside = ~sp.own_mask[0, 0]
    if outside.any():
        j = int(outside.nonzero()[0])
        sp.policy.own.data[0, 0, j] -= 5.0
        torch.testing.assert_close(term(inputs)[0].detach(), before)
    sp.policy.own.data[0, 0, 0] -= 5.0  # token 0 is in the span
    assert not torch.allclose(term(inputs)[0].detach()[0], before[0])


# --- LPOI ---------------------------------------------------------------------------------------------


def released_lpoi(beta, pc, pr, prefc, prefr, pimg: list, refimg: list):
    """lpoi ``get_batch_loss_metrics`` with add_image_dpo: text DPO + ``dpo_pl5_loss`` + anchor (per example)."""
    losses_text_dpo = -F.logsigmoid(beta * ((pc - pr) - (prefc - prefr)))
    chosen_score = beta * (pimg[0] - refimg[0])
    rejected1_score, rejected2_score, rejected3_score, rejected4_score = (beta * (p - r) for p, r in zip(pimg[1:], refimg[1:], strict=True))
    losses1 = -(torch.log(torch.exp(chosen_score)) - torch.log(torch.exp(chosen_score) + torch.exp(rejected1_score) + torch.exp(rejected2_score) + torch.exp(rejected3_score) + torch.exp(rejected4_score)))
    losses2 = -(torch.log(torch.exp(rejected1_score)) - torch.log(torch.exp(rejected1_score) + torch.exp(rejected2_score) + torch.exp(rejected3_score) + torch.exp(rejected4_score)))
    losses3 = -(torch.log(torch.exp(rejected2_score)) - torch.log(torch.exp(rejected2_score) + torch.exp(rejected3_score) + torch.exp(rejected4_score)))
    losses4 = -(torch.log(torch.exp(rejected3_score)) - torch.log(torch.exp(rejected3_score) + torch.exp(rejected4_score)))
    losses_image_dpo = losses1 + losses2 + losses3 + losses4
    anchor_loss_ = -F.logsigmoid(beta * (pc - prefc))
    return losses_text_dpo + losses_image_dpo + anchor_loss_


def lpoi_batch(k: int, seed: int = 0):
    torch.manual_seed(seed)
    policy = SequenceLogps(logps(B).requires_grad_(), logps(B).requires_grad_(), logps(B, k).requires_grad_())
    reference = SequenceLogps(logps(B), logps(B), logps(B, k))
    return policy, reference


def test_lpoi_matches_its_released_loss_in_value_and_gradient():
    policy, reference = lpoi_batch(4)
    objective = PreferenceObjective.preset("lpoi")
    assert [type(t) for t in objective.terms] == [TextDPO, ImageRanking, Anchor] and objective.beta == 0.1
    ours, _ = preference_loss(objective, policy, reference)
    # In the release the image list is the chosen response under the positive, then under each level.
    theirs = released_lpoi(0.1, policy.chosen, policy.rejected, reference.chosen, reference.rejected,
                           [policy.chosen, *policy.negatives.unbind(-1)], [reference.chosen, *reference.negatives.unbind(-1)]).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    leaves = [policy.chosen, policy.rejected, policy.negatives]
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lpoi_with_one_occlusion_level_is_mdpo():
    """K = 1: the ranking is the conditional loss, so LPOI's objective is mDPO's (text + L_cond + anchor)."""
    policy, reference = lpoi_batch(1, seed=1)
    lpoi, _ = preference_loss(PreferenceObjective.preset("lpoi"), policy, reference)
    mdpo, _ = preference_loss(PreferenceObjective.preset("mdpo"), policy, reference)
    torch.testing.assert_close(lpoi, mdpo, rtol=1e-6, atol=1e-6)


def test_the_ranking_loss_is_the_plackett_luce_likelihood_of_the_order_and_stays_finite():
    torch.manual_seed(2)
    p_pos, p_neg, r_pos, r_neg = logps(B), logps(B, 3), logps(B), logps(B, 3)
    s = 0.5 * torch.cat([(p_pos - r_pos).unsqueeze(-1), p_neg - r_neg], -1).double()
    brute = sum(-(s[:, k] - torch.log(torch.exp(s[:, k:]).sum(-1))) for k in range(3))
    torch.testing.assert_close(ranking_loss(p_pos, p_neg, r_pos, r_neg, 0.5).double(), brute, rtol=1e-5, atol=1e-5)
    # a right ranking by far costs nothing; scores of 1e4 stay finite
    huge = ranking_loss(torch.full((1,), 1e4), torch.tensor([[0.0, -1e4, -2e4]]), torch.zeros(1), torch.zeros(1, 3), 1.0)
    assert torch.isfinite(huge).all() and float(huge) < 1e-6


# --- CW-DPO's cooling weight --------------------------------------------------------------------------


@pytest.mark.parametrize("term", [PlackettLuce, ImageRanking])
def test_a_solved_negative_stops_pushing_and_an_unsolved_one_is_unchanged(term):
    """Negative 0 is solved (a = -4, well below the floor -2), negative 1 is not (a = +1)."""
    beta = 0.5
    chosen = torch.zeros(1)
    negatives = torch.tensor([[-8.0, 2.0]])  # a = beta * (neg - chosen) with the reference at 0: [-4, +1]
    reference = SequenceLogps(torch.zeros(1), torch.zeros(1), torch.zeros(1, 2))

    def grads(cooling):
        neg = negatives.clone().requires_grad_()
        policy = SequenceLogps(chosen, torch.zeros(1), neg)
        a = beta * (neg - chosen.unsqueeze(-1))
        loss, metrics = term(cooling=cooling)(TermInputs(policy, reference, beta, advantages=a))
        return loss, torch.autograd.grad(loss.sum(), neg)[0][0], metrics

    plain_loss, plain, _ = grads(None)
    cooled_loss, cooled, metrics = grads(Cooling(floor=-2.0, tau=0.25))
    torch.testing.assert_close(cooled_loss, plain_loss)  # the loss value is the plain term's
    assert plain[0].abs() > 1e-3  # the plain term still pushes the solved negative
    assert cooled[0].abs() < 1e-3 * plain[0].abs()
    torch.testing.assert_close(cooled[1], plain[1], rtol=1e-4, atol=0)
    assert float(metrics["cool/unsolved_share"]) == 0.5


def test_a_cooled_term_builds_from_a_config():
    method = build_method({"beta": 0.5, "negatives": {"source": "random", "k": 2}, "terms": {
        "image": {"class_path": "misp.dpo.terms.PlackettLuce", "init_args": {"cooling": {"floor": -3.0}}},
    }})
    assert method.terms["image"].cooling == Cooling(floor=-3.0, tau=0.5)
    with pytest.raises(ValueError, match="tau"):
        Cooling(tau=0.0)


# --- what each objective needs from the data -------------------------------------------------------------


@pytest.mark.parametrize(("terms", "source", "missing"), [
    ([TextDPO(), ResponsePairs(), PairAnchors()], "counterfactual", "own correct response"),
    ([ResponsePairs(token_mask=True)], "counterfactual", "token spans"),
    ([ResponsePairs(context="in_context")], "given", "two-image context"),
    ([TextDPO(), ImageRanking(), Anchor()], "crop", "rank order"),
])
def test_an_objective_whose_source_cannot_feed_it_is_one_clear_error(terms, source, missing):
    with pytest.raises(MethodError, match=missing) as info:
        Method(beta=0.1, terms={t.name: t for t in terms}, negatives=Negatives(source, 2))
    assert f"source {source!r} gives none" in str(info.value)


def test_lpoi_method_passes_the_check_on_its_source():
    method = Method.preset("lpoi")
    assert (method.negatives.source, method.negatives.k) == ("occlude", 4)
    assert [type(t).__name__ for t in method.objective.terms] == ["TextDPO", "ImageRanking", "Anchor"]
