from __future__ import annotations

import json
import random

import pytest
import torch

from misp.data.eval_data import EvalData
from misp.eval import (
    CHAIRMetric,
    CooccurrenceMetric,
    LikelihoodGroundingMetric,
    MMVPMetric,
    POPEMetric,
    extract_mentions,
    format_results,
    parse_yes_no,
)
from misp.world.generate import WORLD_VERSION

# --- parse_yes_no -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("No, there is not.", "no"),
        ("Yes. No other objects.", "yes"),
        ("not sure", "no"),
        ("Nope", "yes"),
        ("NO", "no"),
        ("There is no red circle.", "no"),
        ("Yes, there is a dog in the image.", "yes"),
        ("yes", "yes"),
        ("", "yes"),
        ("Yes!\nNo.", "yes"),
        ("Yes? Not really.", "yes"),
        ("\n  No", "no"),
        ("There isn't a dog.", "yes"),  # contractions are not the word "not"
        ("Nobody knows; notably nothing.", "yes"),  # whole words only
        ("It is NOT there.", "no"),
        ("Sure\nthere is no cat", "yes"),  # newline ends the first sentence
    ],
)
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) == expected


# --- POPE ---------------------------------------------------------------------------------------------

YES, NO = "Yes, there is.", "No, there is not."


def _answers(tp, fp, tn, fn):
    answers = [YES] * tp + [YES] * fp + [NO] * tn + [NO] * fn
    labels = ["yes"] * tp + ["no"] * fp + ["no"] * tn + ["yes"] * fn
    return answers, labels


def _expected(tp, fp, tn, fn):
    n = tp + fp + tn + fn
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": p,
        "recall": r,
        "f1": 2 * p * r / (p + r) if p + r else 0.0,
        "yes_ratio": (tp + fp) / n,
    }


def test_pope_against_hand_computed_confusion_matrix():
    # tp=3, fp=1, tn=4, fn=2: accuracy 7/10, precision 3/4, recall 3/5, f1 2/3, yes-ratio 4/10.
    answers, labels = _answers(3, 1, 4, 2)
    m = POPEMetric(splits=("random",))
    m.update(answers, labels, ["random"] * 10)
    out = m.compute()
    assert out["pope/random/accuracy"] == pytest.approx(0.7)
    assert out["pope/random/precision"] == pytest.approx(0.75)
    assert out["pope/random/recall"] == pytest.approx(0.6)
    assert out["pope/random/f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert out["pope/random/yes_ratio"] == pytest.approx(0.4)
    assert {k: out[k] for k in out if k.startswith("pope/all/")} == {
        f"pope/all/{k}": v for k, v in _expected(3, 1, 4, 2).items()
    }
    assert all(isinstance(v, float) for v in out.values())


def test_pope_all_yes_and_all_no_answers():
    labels = ["yes"] * 6 + ["no"] * 4
    m = POPEMetric()
    m.update(["Yes."] * 10, labels, ["popular"] * 10)
    out = m.compute()
    assert (out["pope/popular/accuracy"], out["pope/popular/precision"], out["pope/popular/recall"]) == (
        0.6,
        0.6,
        1.0,
    )
    assert out["pope/popular/f1"] == pytest.approx(0.75)
    assert out["pope/popular/yes_ratio"] == 1.0
    # Splits that saw no questions are not reported.
    assert not any(k.startswith("pope/random/") or k.startswith("pope/adversarial/") for k in out)

    m = POPEMetric()
    m.update(["No."] * 10, labels, ["popular"] * 10)
    out = m.compute()
    # No "yes" predictions: precision is 0/0, reported as 0.0, and so is f1.
    assert out["pope/popular/accuracy"] == pytest.approx(0.4)
    assert (out["pope/popular/precision"], out["pope/popular/recall"], out["pope/popular/f1"]) == (
        0.0,
        0.0,
        0.0,
    )
    assert out["pope/popular/yes_ratio"] == 0.0


def test_pope_multi_split():
    counts = {"random": (5, 0, 5, 0), "popular": (4, 2, 3, 1), "adversarial": (2, 4, 1, 3)}
    answers, labels, splits = [], [], []
    for split, c in counts.items():
        a, lab = _answers(*c)
        answers += a
        labels += lab
        splits += [split] * len(a)
    order = list(range(len(answers)))
    random.Random(0).shuffle(order)
    m = POPEMetric()
    for start in range(0, len(order), 7):  # several uneven batches, interleaved splits
        idx = order[start : start + 7]
        m.update([answers[i] for i in idx], [labels[i] for i in idx], [splits[i] for i in idx])
    out = m.compute()
    for split, c in counts.items():
        for k, v in _expected(*c).items():
            assert out[f"pope/{split}/{k}"] == pytest.approx(v), (split, k)
    pooled = tuple(sum(c[i] for c in counts.values()) for i in range(4))
    for k, v in _expected(*pooled).items():
        assert out[f"pope/all/{k}"] == pytest.approx(v)
    assert m.tp.tolist() == [5, 4, 2] and m.fn.tolist() == [0, 1, 3]


def test_pope_rejects_bad_input():
    m = POPEMetric()
    with pytest.raises(ValueError, match="unknown POPE split"):
        m.update(["yes"], ["yes"], ["gqa"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        m.update(["yes"], ["maybe"], ["random"])
    with pytest.raises(ValueError, match="length"):
        m.update(["yes", "no"], ["yes"], ["random"])
    with pytest.raises(ValueError, match="reserved"):
        POPEMetric(splits=("random", "all"))


def test_pope_merge_state_equals_single_instance():
    rng = random.Random(1)
    answers = [rng.choice(["Yes.", "No.", "not sure", "There is no cat."]) for _ in range(40)]
    labels = [rng.choice(["yes", "no"]) for _ in range(40)]
    splits = [rng.choice(["random", "popular", "adversarial"]) for _ in range(40)]
    whole = POPEMetric()
    whole.update(answers, labels, splits)
    a, b = POPEMetric(), POPEMetric()
    a.update(answers[:17], labels[:17], splits[:17])
    b.update(answers[17:], labels[17:], splits[17:])
    a.merge_state(b)
    assert a.compute() == whole.compute()
    # Summing the raw states (what a distributed "sum" reduction does) gives the same counts.
    c, d = POPEMetric(), POPEMetric()
    c.update(answers[:17], labels[:17], splits[:17])
    d.update(answers[17:], labels[17:], splits[17:])
    for name in ("tp", "fp", "tn", "fn"):
        assert torch.equal(getattr(c, name) + getattr(d, name), getattr(whole, name))


# --- extract_mentions ---------------------------------------------------------------------------------

VOCAB = ["dog", "hot dog", "red circle", "circle", "bus", "person", "dining table"]
SYN = {"puppy": "dog", "man": "person", "men": "person", "table": "dining table"}


def test_extract_mentions_longest_match_plural_synonyms_order():
    text = (
        "A man eats a Hot Dog next to two dogs. The puppy sat by the red  circle , near buses and a circle ."
    )
    assert extract_mentions(text, VOCAB, SYN) == [
        "person",
        "hot dog",
        "dog",
        "dog",
        "red circle",
        "bus",
        "circle",
    ]


def test_extract_mentions_word_boundaries():
    assert extract_mentions("dogma and hotdog and busy circles", VOCAB) == ["circle"]
    assert extract_mentions("", VOCAB) == []
    assert extract_mentions("A dining\ntable and a table.", VOCAB, SYN) == ["dining table", "dining table"]


def test_extract_mentions_rejects_bad_synonyms():
    with pytest.raises(ValueError, match="not in the object vocabulary"):
        extract_mentions("x", ["dog"], {"puppy": "cat"})


# --- CHAIR --------------------------------------------------------------------------------------------


def test_chair_hand_counted():
    responses = [
        # mentions: dog, hot dog, bus -> hallucinated: bus (gt dog, hot dog, person)
        "A dog and a hot dog on a bus.",
        # mentions: person (man), person (men), dining table (table) -> none hallucinated; gt person only
        "A man and two men at a table.",
        # no mentions at all
        "Nothing to see.",
        # mentions: circle, circles, red circle -> all hallucinated (gt: bus)
        "A circle, more circles and a red circle.",
    ]
    gt = [["dog", "hot dog", "person"], ["man", "dining table"], ["bus"], ["bus"]]
    m = CHAIRMetric(VOCAB, SYN)
    m.update(responses, gt)
    out = m.compute()
    # mentions 3 + 3 + 0 + 3 = 9; hallucinated 1 + 0 + 0 + 3 = 4
    assert out["chair/chair_i"] == pytest.approx(4 / 9)
    # responses with a hallucination: 1st and 4th of 4
    assert out["chair/chair_s"] == pytest.approx(2 / 4)
    # gt objects (distinct) 3 + 2 + 1 + 1 = 7; covered: dog, hot dog | person, dining table | - | - = 4
    assert out["chair/recall"] == pytest.approx(4 / 7)
    # precision of the mentions 5/9, recall 4/7: F1 = 2 * (5/9) * (4/7) / (5/9 + 4/7) = 40/71
    assert out["chair/object_f1"] == pytest.approx(40 / 71)


def test_chair_empty_denominators_and_errors():
    m = CHAIRMetric(VOCAB)
    m.update(["Nothing here."], [[]])
    # No mentions: CHAIR_i is 0/0 (0.0), but the empty answer names nothing right: its precision counts as 0.
    assert m.compute() == {"chair/chair_i": 0.0, "chair/chair_s": 0.0, "chair/recall": 0.0, "chair/object_f1": 0.0}
    with pytest.raises(ValueError, match="not in the object vocabulary"):
        m.update(["a dog"], [["unicorn"]])
    with pytest.raises(ValueError, match="responses"):
        m.update(["a", "b"], [["dog"]])
    with pytest.raises(TypeError):
        m.update(["a dog"], ["dog"])


def test_chair_merge_state_equals_single_instance():
    rng = random.Random(2)
    words = ["dog", "dogs", "hot dog", "puppy", "bus", "a man", "table", "circle", "nothing", "and"]
    responses = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 6))) for _ in range(30)]
    gt = [
        rng.sample(["dog", "bus", "person", "circle", "dining table"], rng.randint(0, 3)) for _ in range(30)
    ]
    whole = CHAIRMetric(VOCAB, SYN)
    whole.update(responses, gt)
    a, b = CHAIRMetric(VOCAB, SYN), CHAIRMetric(VOCAB, SYN)
    a.update(responses[:11], gt[:11])
    b.update(responses[11:], gt[11:])
    a.merge_state(b)
    assert a.compute() == whole.compute()
    assert whole.responses.item() == 30
    c = CHAIRMetric(VOCAB, SYN)
    c.update([], [])  # an empty batch changes nothing
    c.merge_state({k: getattr(a, k) for k in a._defaults})
    c.merge_state({k: torch.zeros_like(getattr(a, k)) for k in a._defaults})
    assert c.compute() == whole.compute()


# --- co-occurrence hallucination ----------------------------------------------------------------------

SHAPES = ["red circle", "blue square", "green triangle", "yellow circle", "red square"]
PAIRS = ["red circle -> blue square", "green triangle -> yellow circle"]


def test_cooccurrence_hand_counted():
    responses = [
        # trigger red circle, partner blue square missing and named; red square also hallucinated
        "a red circle. a blue square. a red square.",
        # trigger green triangle, partner yellow circle missing, not named
        "a green triangle.",
        # both triggers, both partners missing; names yellow circle only
        "a red circle. a green triangle. a yellow circle.",
        # no trigger: blue square is an ordinary hallucination, not a missing partner
        "a blue square.",
        # trigger with its partner present: no case
        "a red circle and a blue square.",
    ]
    gt = [
        ["red circle"],
        ["green triangle"],
        ["red circle", "green triangle"],
        ["red square"],
        ["red circle", "blue square"],
    ]
    m = CooccurrenceMetric(PAIRS, SHAPES)
    m.update(responses, gt)
    out = m.compute()
    # cases: 1 + 1 + 2 = 4; partners named: blue square (1st), yellow circle (3rd) = 2
    assert out["cooccurrence/partner_rate"] == pytest.approx(2 / 4)
    assert out["cooccurrence/cases"] == 4
    # other absent objects of the case images: 5-1-1=3, 3, 5-2-2=1 -> 7; named: red square (1st) = 1
    assert out["cooccurrence/other_rate"] == pytest.approx(1 / 7)
    # hallucinated mentions: blue square, red square | - | yellow circle | blue square | - = 4, partners 2
    assert out["cooccurrence/partner_share"] == pytest.approx(2 / 4)


def test_cooccurrence_partner_present_rate_hand_counted():
    """A looking model names a present partner; a suppressing one does not: the two rates tell them apart."""
    gt = [
        ["red circle", "blue square"],  # pair 1 present
        ["red circle", "blue square", "green triangle", "yellow circle"],  # both pairs present
        ["blue square"],  # partner without its trigger: no case
        ["red circle"],  # partner absent: an absent case, not a present one
    ]
    looking = [
        "a red circle. a blue square.",  # names the present partner (1 of 1)
        "a red circle. a blue square. a green triangle.",  # names blue square, not yellow circle (1 of 2)
        "a blue square.",
        "a red circle.",  # leaves the absent partner out
    ]
    suppressing = ["a red circle.", "a red circle. a green triangle.", "a blue square.", "a red circle."]
    m = CooccurrenceMetric(PAIRS, SHAPES)
    m.update(looking, gt)
    out = m.compute()
    assert out["cooccurrence/present_cases"] == 3
    assert out["cooccurrence/partner_present_rate"] == pytest.approx(2 / 3)
    assert out["cooccurrence/cases"] == 1 and out["cooccurrence/partner_rate"] == 0.0
    m.reset()
    m.update(suppressing, gt)
    assert m.compute()["cooccurrence/partner_present_rate"] == 0.0
    assert m.compute()["cooccurrence/partner_rate"] == 0.0
    # No present case at all: the rate is 0.0, not a division error.
    m.reset()
    m.update(["a red circle."], [["red circle"]])
    assert m.compute()["cooccurrence/partner_present_rate"] == 0.0
    assert m.compute()["cooccurrence/present_cases"] == 0


def test_cooccurrence_merge_errors_and_pairs_from_a_world(tmp_path):
    rng = random.Random(0)
    responses = [". ".join(rng.sample(SHAPES, rng.randint(0, 3))) for _ in range(40)]
    gt = [rng.sample(SHAPES, rng.randint(1, 3)) for _ in range(40)]
    whole, a, b = (CooccurrenceMetric(PAIRS, SHAPES) for _ in range(3))
    whole.update(responses, gt)
    a.update(responses[:17], gt[:17])
    b.update(responses[17:], gt[17:])
    a.merge_state(b)
    assert a.compute() == whole.compute() and whole.compute()["cooccurrence/cases"] > 0
    assert whole.compute()["cooccurrence/present_cases"] > 0
    with pytest.raises(ValueError, match="TRIGGER -> PARTNER"):
        CooccurrenceMetric(["red circle blue square"], SHAPES)
    with pytest.raises(ValueError, match="not in the object vocabulary"):
        CooccurrenceMetric(["red circle -> unicorn"], SHAPES)
    with pytest.raises(ValueError, match="at least one"):
        CooccurrenceMetric([], SHAPES)
    # EvalData reads the pairs of a world.json beside the captions file; an explicit [] turns them off.
    (tmp_path / "world.json").write_text(
        json.dumps({"version": WORLD_VERSION, "objects": [], "bias_pairs": [{"trigger": "red circle", "partner": "blue square"}]})
    )
    captions = str(tmp_path / "test.jsonl")
    assert EvalData(captions_file=captions).pairs() == ["red circle -> blue square"]
    assert EvalData(captions_file=captions, cooccurrence_pairs=[]).pairs() == []
    assert EvalData(captions_file=str(tmp_path / "elsewhere" / "t.jsonl")).pairs() == []


# --- format_results -----------------------------------------------------------------------------------


def test_format_results_aligns_columns():
    results = {
        "pope/random/accuracy": 0.85,
        "pope/random/f1": 0.8,
        "pope/adversarial/accuracy": 0.7,
        "pope/adversarial/f1": 0.6512,
        "chair/chair_i": 0.1,
        "chair/chair_s": 0.25,
        "loss": 1.5,
    }
    text = format_results(results)
    tables = text.split("\n\n")
    assert len(tables) == 3
    pope = tables[0].splitlines()
    assert pope[0].split() == ["pope", "accuracy", "f1"]
    assert pope[1].split() == ["random", "0.8500", "0.8000"]
    assert pope[2].split() == ["adversarial", "0.7000", "0.6512"]
    # right-aligned numbers: each column ends at the same character in every line
    assert len({len(line) for line in pope}) == 1
    assert tables[1].splitlines()[1].split() == ["chair", "0.1000", "0.2500"]
    assert tables[2].splitlines()[1].split() == ["loss", "1.5000"]
    assert format_results({}) == ""


# --- Shapes-MMVP ----------------------------------------------------------------------------------------


def test_mmvp_pair_accuracy_hand_counted():
    m = MMVPMetric()
    m.update(
        answers_a=["Yes", "yes", "no", "yes", "No."],
        answers_b=["no", "yes", "yes", "no", "Yes, there is."],
        labels_a=["yes", "yes", "no", "no", "no"],
        labels_b=["no", "no", "yes", "yes", "yes"],
        attributes=["color", "color", "size", "position", "position"],
    )
    out = m.compute()
    # right pairs: 1st (color), 3rd (size), 5th (position); the 2nd answers "yes" to both and the 4th swaps.
    assert out["mmvp/pair_accuracy"] == pytest.approx(3 / 5)
    assert out["mmvp/pairs"] == 5
    # right answers: 2 + 1 + 2 + 0 + 2 = 7 of 10: single questions overstate what pairs show.
    assert out["mmvp/question_accuracy"] == pytest.approx(7 / 10)
    assert out["mmvp/color/pair_accuracy"] == pytest.approx(1 / 2)
    assert out["mmvp/size/pair_accuracy"] == 1.0
    assert out["mmvp/position/pair_accuracy"] == pytest.approx(1 / 2)
    assert "mmvp/shape/pair_accuracy" not in out  # no shape pair seen
    # A model that always says "yes" gets half the questions and no pair.
    always = MMVPMetric()
    always.update(["yes"] * 4, ["yes"] * 4, ["yes", "no", "yes", "no"], ["no", "yes", "no", "yes"], ["shape"] * 4)
    assert always.compute()["mmvp/pair_accuracy"] == 0.0
    assert always.compute()["mmvp/question_accuracy"] == pytest.approx(0.5)


def test_mmvp_merge_and_errors():
    rng = random.Random(1)
    attrs = ["color", "shape", "size", "position"]
    n = 37
    la = [rng.choice(["yes", "no"]) for _ in range(n)]
    lb = ["no" if x == "yes" else "yes" for x in la]
    aa = [rng.choice(["yes", "no", "maybe no"]) for _ in range(n)]
    ab = [rng.choice(["yes", "no"]) for _ in range(n)]
    at = [rng.choice(attrs) for _ in range(n)]
    whole, a, b = MMVPMetric(), MMVPMetric(), MMVPMetric()
    whole.update(aa, ab, la, lb, at)
    a.update(aa[:11], ab[:11], la[:11], lb[:11], at[:11])
    b.update(aa[11:], ab[11:], la[11:], lb[11:], at[11:])
    a.merge_state(b)
    assert a.compute() == whole.compute()
    assert whole.compute()["mmvp/pairs"] == n
    with pytest.raises(ValueError, match="unknown attribute 'texture'"):
        MMVPMetric().update(["yes"], ["no"], ["yes"], ["no"], ["texture"])
    with pytest.raises(ValueError, match="differ in length"):
        MMVPMetric().update(["yes"], ["no"], ["yes"], ["no"], [])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        MMVPMetric().update(["yes"], ["no"], ["maybe"], ["no"], ["color"])
    empty = MMVPMetric()
    empty.update([], [], [], [], [])
    assert empty.compute()["mmvp/pair_accuracy"] == 0.0  # nothing seen: 0/0 is 0.0


# --- likelihood grounding -------------------------------------------------------------------------------


def test_likelihood_grounding_hand_counted():
    m = LikelihoodGroundingMetric()
    own = torch.tensor([-10.0, -12.0, -8.0])
    # caption 0: beats color (-11) and size (-10.5); caption 1: beats shape (-13), ties position (-12)
    # -> loses; caption 2: beats color (-9), loses to position (-7.5).
    cf = torch.tensor([-11.0, -10.5, -13.0, -12.0, -9.0, -7.5])
    caption = torch.tensor([0, 0, 1, 1, 2, 2])
    attrs = ["color", "size", "shape", "position", "color", "position"]
    m.update(own, cf, caption, attrs)
    out = m.compute()
    assert out["grounding/likelihood"] == pytest.approx(1 / 3)
    assert out["grounding/captions"] == 3
    assert out["grounding/likelihood_color"] == 1.0
    assert out["grounding/likelihood_size"] == 1.0
    assert out["grounding/likelihood_shape"] == 1.0
    assert out["grounding/likelihood_position"] == 0.0  # a tie and a loss
    # An image-blind model scores every image alike: every comparison is a tie, so 0.
    blind = LikelihoodGroundingMetric()
    blind.update(torch.full((2,), -5.0), torch.full((4,), -5.0), torch.tensor([0, 0, 1, 1]), ["size"] * 4)
    assert blind.compute()["grounding/likelihood"] == 0.0


def test_likelihood_grounding_merge_and_errors():
    gen = torch.Generator().manual_seed(0)
    n = 20
    own = torch.randn(n, generator=gen)
    caption = torch.arange(n).repeat_interleave(3)
    cf = torch.randn(3 * n, generator=gen)
    attrs = [random.Random(i).choice(["color", "shape", "size", "position"]) for i in range(3 * n)]
    whole, a, b = LikelihoodGroundingMetric(), LikelihoodGroundingMetric(), LikelihoodGroundingMetric()
    whole.update(own, cf, caption, attrs)
    a.update(own[:7], cf[:21], caption[:21], attrs[:21])
    b.update(own[7:], cf[21:], caption[21:] - 7, attrs[21:])
    a.merge_state(b)
    assert a.compute() == whole.compute()
    # The pooled share is the per-caption AND over its counterfactuals, computed here independently.
    expected = sum(bool((own[i] > cf[3 * i : 3 * i + 3]).all()) for i in range(n)) / n
    assert whole.compute()["grounding/likelihood"] == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"captions \[1\] have no counterfactual"):
        LikelihoodGroundingMetric().update(torch.zeros(2), torch.zeros(1), torch.tensor([0]), ["color"])
    with pytest.raises(ValueError, match="must lie in"):
        LikelihoodGroundingMetric().update(torch.zeros(1), torch.zeros(1), torch.tensor([3]), ["color"])
    with pytest.raises(ValueError, match="unknown attribute"):
        LikelihoodGroundingMetric().update(torch.zeros(1), torch.zeros(1), torch.tensor([0]), ["texture"])
