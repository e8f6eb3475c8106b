"""The published benchmarks' readers, answer parsers, judges and metrics, on tiny files in each
benchmark's official layout with hand-counted scores."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import Image

from misp.data.records import RecordError
from misp.errors import ConfigError
from misp.eval.amber import AMBER
from misp.eval.answers import parse_options, read_option, read_pope, read_yes_no
from misp.eval.coco import CocoObjects, coco_synonyms
from misp.eval.generations import GenerationsFile
from misp.eval.hallusionbench import HallusionBench
from misp.eval.judge import ChatJudge, JudgeConfig, JudgeError
from misp.eval.mmhal import JUDGE_TEMPLATE, MMHalBench, parse_rating
from misp.eval.mmvp_bench import MMVP
from misp.eval.objhal import ObjectHalBench
from misp.eval.pope import POPE
from misp.eval.run import build_benchmarks
from misp.eval.table import paper_table


def _image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (shade, 40, 90)).save(path)


def _score(bench, answers: dict[str, str]) -> dict[str, float]:
    questions = bench.questions()
    metric = bench.metric()
    metric.update([bench.judge(q, answers[q.id]) for q in questions])
    return metric.compute()


# ---- answer parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "expected"), [
    ("Yes, there is a dog in the image.", "yes"),
    ("yes", "yes"),
    ("Yes. The dog is sitting on the grass.", "yes"),
    ("No, there is no cat in the image.", "no"),
    ("There is no cat in this picture.", "no"),
    ("No.", "no"),
    ("The man is not holding an umbrella.", "no"),
    ("", None),
    ("I cannot determine that from the picture.", None),
    ("Yes and no: it depends on the angle.", None),
])
def test_yes_no_reader_on_answers_models_write(answer, expected):
    assert read_yes_no(answer) == expected


def test_pope_reader_keeps_the_reference_rule_and_only_an_empty_answer_is_unreadable():
    assert read_pope("There is a car in the image.") == "yes"  # POPE's evaluate.py: no negation -> yes
    assert read_pope("No. But there is a truck.") == "no"
    assert read_pope("I do not see one.") == "no"
    assert read_pope("  ") is None


@pytest.mark.parametrize(("answer", "expected"), [
    ("The answer is (B).", "b"),
    ("(a) Open", "a"),
    ("B. Closed", "b"),
    ("b", "b"),
    ("Answer: A", "a"),
    ("Closed", "b"),
    ("The butterfly's wings are open.", "a"),
    ("I am not sure.", None),
    ("(a) or (b)", None),
])
def test_option_reader_on_answers_models_write(answer, expected):
    options = parse_options("(a) Open (b) Closed")
    assert options == {"a": "Open", "b": "Closed"}
    assert read_option(answer, options) == expected


def test_option_reader_prefers_the_longer_option_text():
    options = parse_options("(a) red (b) red and white")
    assert read_option("It is red and white.", options) == "b"
    assert read_option("Red.", options) == "a"


def test_judge_rating_parser_follows_the_official_script():
    assert parse_rating("The response is accurate.\nRating: 5, very informative") == 5
    assert parse_rating("rating: 0") == 0
    assert parse_rating("I would give Rating: 2 or Rating: 3") is None
    assert parse_rating("Excellent answer.") is None


# ---- POPE ------------------------------------------------------------------------------------------------


def _pope_files(root: Path) -> None:
    for i in range(2):
        _image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i * 100)
    rows = {
        "random": [(1, "yes"), (2, "no"), (3, "no"), (4, "yes")],
        "adversarial": [(1, "yes"), (2, "no")],
    }
    for split, qs in rows.items():
        with open(root / f"coco_pope_{split}.json", "w") as f:
            for qid, label in qs:
                f.write(json.dumps({"question_id": qid, "image": f"COCO_val2014_{qid % 2:012d}.jpg",
                                    "text": "Is there a dog in the image?", "label": label}) + "\n")


def test_pope_scores_each_split_as_the_reference_script_with_unreadable_answers_apart(tmp_path, caplog):
    root = tmp_path / "pope"
    root.mkdir()
    _pope_files(root)
    answers = {
        "random/1": "Yes, there is a dog in the image.",  # TP
        "random/2": "No, there is no dog.",  # TN
        "random/3": "There is a dog in the image.",  # FP (no negation reads yes)
        "random/4": "",  # unreadable, truth yes: a miss, never a "no"
        "adversarial/1": "No. The image shows a cat.",  # FN
        "adversarial/2": "I do not see one.",  # TN
    }
    r = _score(POPE(root), answers)
    assert r["pope/random/accuracy"] == pytest.approx(2 / 4)
    assert r["pope/random/precision"] == pytest.approx(1 / 2)
    assert r["pope/random/recall"] == pytest.approx(1 / 2)
    assert r["pope/random/f1"] == pytest.approx(1 / 2)
    assert r["pope/random/yes_ratio"] == pytest.approx(2 / 4)
    assert r["pope/random/unreadable"] == 1
    assert r["pope/adversarial/accuracy"] == pytest.approx(1 / 2)
    assert r["pope/adversarial/recall"] == 0.0
    assert r["pope/all/accuracy"] == pytest.approx(3 / 6)
    assert r["pope/all/recall"] == pytest.approx(1 / 3)
    assert r["pope/all/f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert "pope/popular/accuracy" not in r  # a split without its file is left out, not scored 0
    # The unreadable answer was named by file and question id.
    assert any("coco_pope_random.json" in m and "random/4" in m for m in caplog.messages)


def test_pope_bad_record_and_missing_image_name_the_file(tmp_path):
    root = tmp_path / "pope"
    root.mkdir()
    _pope_files(root)
    (root / "coco_pope_random.json").write_text(
        json.dumps({"question_id": 1, "image": "COCO_val2014_000000000000.jpg", "text": "Is there a dog?"}) + "\n")
    with pytest.raises(RecordError, match=r"coco_pope_random.json:1: field 'label'"):
        POPE(root).questions()
    (root / "coco_pope_random.json").write_text(
        json.dumps({"question_id": 1, "image": "missing.jpg", "text": "Is there a dog?", "label": "yes"}) + "\n")
    with pytest.raises(RecordError, match=r"coco_pope_random.json:1"):
        POPE(root).questions()


# ---- HallusionBench --------------------------------------------------------------------------------------


def test_hallusionbench_aacc_facc_qacc(tmp_path):
    root = tmp_path / "hallusionbench"
    rows = []
    for figure in ("0", "1"):
        _image(root / "hallusion_bench" / "VD" / "illusion" / f"0_{figure}.png")
        for qid, gt in (("0", "1" if figure == "0" else "0"), ("1", "0")):
            rows.append({"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0",
                         "figure_id": figure, "question_id": qid, "question": f"Question {qid}?",
                         "gt_answer": gt, "filename": f"./VD/illusion/0_{figure}.png"})
    rows.append({"category": "VS", "subcategory": "chart", "visual_input": "0", "set_id": "0", "figure_id": "0",
                 "question_id": "0", "question": "Text only?", "gt_answer": "1", "filename": None})
    root.mkdir(parents=True, exist_ok=True)
    (root / "HallusionBench.json").write_text(json.dumps(rows))
    bench = HallusionBench(root)
    assert len(bench.questions()) == 4  # the text-only question is left out
    assert bench.questions()[0].prompt == "Question 0? Please answer yes or no."
    answers = {
        "VD_illusion_0_0_0": "Yes, it is.",  # right
        "VD_illusion_0_0_1": "No.",  # right
        "VD_illusion_0_1_0": "Maybe.",  # unreadable: wrong
        "VD_illusion_0_1_1": "No, it is not.",  # right
    }
    r = _score(bench, answers)
    assert r["hallusionbench/aAcc"] == pytest.approx(3 / 4)
    assert r["hallusionbench/fAcc"] == pytest.approx(1 / 2)  # figure 0 all right, figure 1 not
    assert r["hallusionbench/qAcc"] == pytest.approx(1 / 2)  # question 1 right on both figures, question 0 not
    assert r["hallusionbench/unreadable"] == 1


def test_hallusionbench_bad_answer_field_names_the_record(tmp_path):
    root = tmp_path / "hallusionbench"
    root.mkdir()
    (root / "HallusionBench.json").write_text(json.dumps([{"category": "VD", "subcategory": "x", "visual_input": "1",
        "set_id": "0", "figure_id": "0", "question_id": "0", "question": "?", "gt_answer": "yes"}]))
    with pytest.raises(RecordError, match=r"HallusionBench.json:1: field 'gt_answer'"):
        HallusionBench(root).questions()


# ---- MMVP ------------------------------------------------------------------------------------------------


def _mmvp_files(root: Path) -> None:
    rows = [
        (1, "Are the butterfly's wings open or closed?", "(a) Open (b) Closed", "(a)"),
        (2, "Are the butterfly's wings open or closed?", "(a) Open (b) Closed", "(b)"),
        (3, "Is the dog facing left or right?", "(a) Left (b) Right", "(b)"),
        (4, "Is the dog facing left or right?", "(a) Left (b) Right", "(a)"),
    ]
    root.mkdir(parents=True, exist_ok=True)
    lines = ["Index,Question,Options,Correct Answer"] + [f'{i},"{q}",{o},{a}' for i, q, o, a in rows]
    (root / "Questions.csv").write_text("\n".join(lines) + "\n")
    for i, *_ in rows:
        _image(root / "MMVP Images" / f"{i}.jpg", i * 30)


def test_mmvp_pair_accuracy_from_option_matching(tmp_path):
    root = tmp_path / "mmvp"
    _mmvp_files(root)
    bench = MMVP(root)
    questions = bench.questions()
    assert questions[0].prompt == "Are the butterfly's wings open or closed? (a) Open (b) Closed"
    answers = {"1": "The answer is (A).", "2": "(a) Open", "3": "Right", "4": "Left."}
    r = _score(bench, answers)
    assert r["mmvp/pair_accuracy"] == pytest.approx(1 / 2)
    assert r["mmvp/question_accuracy"] == pytest.approx(3 / 4)
    assert r["mmvp/unreadable"] == 0


def test_mmvp_metric_merges_pairs_split_across_ranks(tmp_path):
    root = tmp_path / "mmvp"
    _mmvp_files(root)
    bench = MMVP(root)
    qs = bench.questions()
    answers = ["(a)", "(b)", "(b)", "I am not sure"]
    judged = [bench.judge(q, a) for q, a in zip(qs, answers, strict=True)]
    rank0, rank1 = bench.metric(), bench.metric()
    rank0.update([judged[0], judged[2]])  # each pair's halves on different ranks
    rank1.update([judged[1], judged[3]])
    rank0.merge_state(rank1)
    r = rank0.compute()
    assert r["mmvp/pair_accuracy"] == pytest.approx(1 / 2)
    assert r["mmvp/unreadable"] == 1


def test_mmvp_wrong_layout_names_the_column(tmp_path):
    root = tmp_path / "mmvp"
    root.mkdir()
    (root / "Questions.csv").write_text("Index,Question,Answer\n1,q,(a)\n")
    with pytest.raises(RecordError, match=r"Questions.csv:1: field 'Options'"):
        MMVP(root).questions()


# ---- AMBER -----------------------------------------------------------------------------------------------


def test_amber_generative_and_discriminative_scores(tmp_path):
    root = tmp_path / "amber"
    (root / "data" / "query").mkdir(parents=True)
    relation = {"dog": ["puppy"], "grass": ["ground"], "person": ["man", "woman"], "cat": [], "tree": [], "light": []}
    (root / "data" / "relation.json").write_text(json.dumps(relation))
    (root / "data" / "safe_words.txt").write_text("light\norange\n")
    annotations = [
        {"id": 1, "type": "generative", "truth": ["dog", "grass"], "hallu": ["cat", "tree"]},
        {"id": 2, "type": "discriminative-hallucination", "truth": "no"},
        {"id": 3, "type": "discriminative-attribute-state", "truth": "yes"},
        {"id": 4, "type": "relation", "truth": "no"},
    ]
    (root / "data" / "annotations.json").write_text(json.dumps(annotations))
    queries = [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
               {"id": 2, "image": "AMBER_1.jpg", "query": "Is there a cat in this image?"},
               {"id": 3, "image": "AMBER_1.jpg", "query": "Is the dog brown in this image?"},
               {"id": 4, "image": "AMBER_1.jpg", "query": "Is the dog on the tree in this image?"}]
    (root / "data" / "query" / "query_all.json").write_text(json.dumps(queries))
    _image(root / "image" / "AMBER_1.jpg")
    bench = AMBER(root)
    qs = bench.questions()
    assert qs[0].max_new_tokens == AMBER.description_tokens and qs[1].max_new_tokens is None
    answers = {
        # AMBER words: puppy (-> dog, covered), ground (-> grass, covered), cats (hallucinated, a
        # hallucination-prone object: Cog), man (hallucinated), light (a safe word: not counted as either).
        "1": "A puppy plays on the ground next to two cats and a man under the light.",
        "2": "No, there is no cat.",  # truth no: right (the positive class is "no")
        "3": "Yes.",  # truth yes: right
        "4": "Yes, it is.",  # truth no: wrong
    }
    r = _score(bench, answers)
    assert r["amber/generative/CHAIR"] == pytest.approx(2 / 5)
    assert r["amber/generative/Cover"] == pytest.approx(1.0)
    assert r["amber/generative/Hal"] == pytest.approx(1.0)
    assert r["amber/generative/Cog"] == pytest.approx(1 / 2)
    assert r["amber/existence/accuracy"] == 1.0 and r["amber/existence/f1"] == 1.0
    assert r["amber/attribute/accuracy"] == 1.0
    assert r["amber/relation/accuracy"] == 0.0
    assert r["amber/discriminative/accuracy"] == pytest.approx(2 / 3)
    assert r["amber/discriminative/precision"] == pytest.approx(1.0)
    assert r["amber/discriminative/recall"] == pytest.approx(1 / 2)
    assert r["amber/discriminative/f1"] == pytest.approx(2 / 3)


# ---- Object HalBench -------------------------------------------------------------------------------------


def test_coco_synonym_table_ships_with_the_package_and_matches_as_chair():
    table = coco_synonyms()
    assert len(table) == 80 and table[0][0] == "person"
    coco = CocoObjects()
    assert coco.words("Two men ride motorcycles past a baby elephant and a toilet seat.") == [
        "person", "motorcycle", "elephant", "toilet"]
    assert coco.words("A passenger train crosses home plate near a hot dog.") == ["train", "hot dog"]


def test_object_halbench_chair_from_coco_annotations(tmp_path):
    root = tmp_path / "objhal"
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}]
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps({
        "categories": categories,
        "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 1},
                        {"image_id": 9, "category_id": 17}],
    }))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"annotations": [
        {"image_id": 1, "caption": "A dog lying on a couch."},
        {"image_id": 2, "caption": "A man riding a bike."},
    ]}))
    (root / "objhal_questions.jsonl").write_text(
        "".join(json.dumps({"image_id": i, "question": "Describe this image in detail."}) + "\n" for i in (1, 2)))
    for i in (1, 2):
        _image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    bench = ObjectHalBench(root)
    answers = {
        "1": "Two dogs sleep on a sofa next to a cat.",  # dog, couch, cat: cat hallucinated
        "2": "A person rides a bicycle past people.",  # person, bicycle, person
    }
    r = _score(bench, answers)
    assert r["objhal/CHAIR_s"] == pytest.approx(1 / 2)
    assert r["objhal/CHAIR_i"] == pytest.approx(1 / 6)
    assert r["objhal/recall"] == pytest.approx(1.0)


def test_object_halbench_without_coco_annotations_is_refused(tmp_path):
    root = tmp_path / "objhal"
    root.mkdir()
    (root / "objhal_questions.jsonl").write_text(json.dumps({"image_id": 1, "question": "Describe."}) + "\n")
    with pytest.raises(RecordError, match="annotations"):
        ObjectHalBench(root).questions()


# ---- MMHal-Bench and its judge ---------------------------------------------------------------------------


class _ChatServer:
    """An OpenAI chat-completions endpoint on 127.0.0.1 whose replies depend on the graded answer."""

    def __init__(self, replies: dict[str, str], fail_first: int = 0, refuse: int | None = None) -> None:
        self.requests: list[tuple[dict, dict]] = []
        self.fail_first = fail_first  # answer the first N requests with HTTP 503 (transient)
        self.refuse = refuse  # answer request number N (1-based) with HTTP 400 (not retried)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((dict(self.headers), body))
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                if outer.fail_first > 0 or len(outer.requests) == outer.refuse:
                    self.send_response(503 if outer.fail_first > 0 else 400)
                    self.end_headers()
                    outer.fail_first = max(0, outer.fail_first - 1)
                    return
                graded = body["messages"][0]["content"].rsplit("### LMM Response to Evaluate\n", 1)[1].strip()
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": replies[graded]}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _mmhal_files(root: Path) -> None:
    rows = [
        {"question_type": "attribute", "question_topic": "animal", "image_id": "a", "image_src": "https://x/1.jpg",
         "image_content": ["Cat", "Sofa"], "question": "What colour is the cat?", "gt_answer": "The cat is black.",
         "model_answer": ""},
        {"question_type": "counting", "question_topic": "animal", "image_id": "b", "image_src": "https://x/2.jpg",
         "image_content": ["Dog"], "question": "How many dogs?", "gt_answer": "Two.", "model_answer": ""},
        {"question_type": "attribute", "question_topic": "animal", "image_id": "c", "image_src": "https://x/3.jpg",
         "image_content": ["Bird"], "question": "What is the bird doing?", "gt_answer": "Flying.", "model_answer": ""},
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "response_template.json").write_text(json.dumps(rows))
    for i in (1, 2, 3):
        _image(root / "images" / f"{i}.jpg", i * 40)


def test_mmhal_judged_by_a_local_openai_compatible_server(tmp_path, monkeypatch):
    root = tmp_path / "mmhal"
    _mmhal_files(root)
    replies = {"A black cat.": "Accurate and informative.\nRating: 5, very informative, no hallucination",
               "Three dogs.": "Wrong count.\nRating: 1, somewhat informative, with hallucination",
               "It sings.": "Hard to say."}  # no rating: scored 0 as the official script does, counted
    monkeypatch.setenv("MISP_TEST_JUDGE_KEY", "sk-test")
    with _ChatServer(replies, fail_first=1) as server:
        judge = ChatJudge(JudgeConfig(url=server.url + "/", model="judge-model", api_key_env="MISP_TEST_JUDGE_KEY",
                                      retries=2))
        bench = MMHalBench(root, judge=judge)
        r = _score(bench, {"1": "A black cat.", "2": "Three dogs.", "3": "It sings."})
        headers, body = server.requests[-1]
    assert r["mmhal/score"] == pytest.approx((5 + 1 + 0) / 3)
    assert r["mmhal/hallucination_rate"] == pytest.approx(2 / 3)
    assert r["mmhal/attribute/score"] == pytest.approx(2.5)
    assert r["mmhal/counting/score"] == pytest.approx(1.0)
    assert r["mmhal/unreadable"] == 1
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["messages"][0]["content"] == JUDGE_TEMPLATE.format("Bird", "What is the bird doing?", "Flying.",
                                                                   "It sings.")
    assert len(server.requests) == 4  # one 503 retried, then one request per answer


def test_judge_refusal_is_one_clear_error():
    with _ChatServer({}) as server:
        judge = ChatJudge(JudgeConfig(url=server.url + "/wrong", retries=0))
        with pytest.raises(JudgeError, match="HTTP 404"):
            judge("hello")


def test_mmhal_without_a_judge_is_refused_never_scored_zero(tmp_path, monkeypatch):
    monkeypatch.delenv("MISP_JUDGE_URL", raising=False)
    with pytest.raises(ConfigError, match="mmhal is scored by an LLM judge"):
        build_benchmarks(["pope", "mmhal"], tmp_path, judge=JudgeConfig())
    with pytest.raises(RecordError, match="no[ne]* is configured"):
        MMHalBench(tmp_path / "mmhal").questions()
    with pytest.raises(ConfigError, match="unknown benchmark 'wildvision'"):
        build_benchmarks(["wildvision"], tmp_path)


# ---- generations file and table --------------------------------------------------------------------------


def test_generations_file_drops_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "generations" / "pope.jsonl"
    store = GenerationsFile(path)
    store.append([{"id": "a", "answer": "yes"}, {"id": "b", "answer": "no"}])
    with open(path, "a") as f:
        f.write('{"id": "c", "answ')  # the kill came mid-write
    again = GenerationsFile(path)
    assert set(again.records) == {"a", "b"} and "c" not in again
    again.append([{"id": "c", "answer": "yes"}])
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_paper_table_puts_runs_side_by_side_in_percent():
    table = paper_table({"base": {"pope/all/f1": 0.8512, "mmhal/score": 2.0},
                         "misp": {"pope/all/f1": 0.8731}}).splitlines()
    assert table[0].split() == ["model", "MMHal", "score", "POPE", "F1"]
    assert table[1].split() == ["base", "2.0", "85.1"]
    assert table[2].split() == ["misp", "87.3"]


def test_a_failing_judge_costs_no_answer_and_resume_judges_what_was_kept(tmp_path, monkeypatch):
    """The judge endpoint goes down after one answer: the generated answers are kept (judgement null),
    and the rerun judges them without generating anything again."""
    import misp.eval.run as run

    root = tmp_path / "mmhal"
    _mmhal_files(root)
    generated: list[str] = []

    def fake_generate(model, processor, images, prompts, max_new_tokens, batch_size):
        generated.extend(prompts)
        return [{"What colour is the cat?": "A black cat.", "How many dogs?": "Three dogs.",
                 "What is the bird doing?": "It sings."}[p] for p in prompts]

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    processor = type("P", (), {"tokenizer": Tok()})()
    monkeypatch.setattr(run, "generate_answers", fake_generate)
    replies = {"A black cat.": "Rating: 5", "Three dogs.": "Rating: 1", "It sings.": "Rating: 3"}
    with _ChatServer(replies, refuse=2) as server:  # the second judge request fails outright
        bench = MMHalBench(root, judge=ChatJudge(JudgeConfig(url=server.url, retries=0)))
        questions = bench.questions()
        with pytest.raises(JudgeError, match="HTTP 400"):
            run.evaluate_benchmark(bench, questions, None, processor, tmp_path / "out", batch_size=3)
        store = GenerationsFile(tmp_path / "out" / "generations" / "mmhal.jsonl")
        assert len(store.records) == 3 and len(generated) == 3  # all three answers kept
        assert sum(r["judgement"] is None for r in store.records.values()) == 2
        results = run.evaluate_benchmark(bench, questions, None, processor, tmp_path / "out", batch_size=3)
    assert len(generated) == 3  # nothing generated again
    assert results["mmhal/score"] == pytest.approx((5 + 1 + 3) / 3)
    lines = (tmp_path / "out" / "generations" / "mmhal.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["judgement"] is not None for line in lines)
