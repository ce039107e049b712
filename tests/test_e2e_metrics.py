"""Golden values for the official E2E metrics (kasa.evaluation.e2e_metrics).

BLEU and NIST are worked out by hand below, following mteval-v13a as the official e2e-metrics script runs it
(lowercased, mteval tokenisation, corpus sums, closest reference length, smoothing of zero matches, NIST
information weights from all references, NIST's average reference length over the non-empty references). ROUGE-L is worked
out by hand as pycocoevalcap computes it; METEOR and CIDEr-D get sanity checks (an exact copy of a reference beats a
paraphrase, which beats an unrelated sentence). Tests that run pycocoevalcap need Java and skip without it."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

from kasa.evaluation import e2e_metrics
from kasa.data.files import read_e2e_file
from kasa.evaluation.e2e_metrics import (
    E2E_METRIC_NAMES,
    bleu_nist_scores,
    coco_scores,
    e2e_scores,
    group_references,
    mteval_tokenize,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
needs_data = pytest.mark.skipif(not (DATA / "e2e").is_dir(), reason="the shared E2E data is not available")


# ---------------------------------------------------------------------------------------------------- tokenisation


def test_mteval_tokenization():
    # symbols and sentence punctuation split off, apostrophes and in-word hyphens stay, "." and "," between digits
    # stay, a "-" after a digit splits, only ASCII letters are lowercased (mteval's tr/[A-Z]/[a-z]/)
    assert mteval_tokenize("It's near the river, 5.5 miles away.") == [
        "it's", "near", "the", "river", ",", "5.5", "miles", "away", ".",
    ]
    assert mteval_tokenize('A "kid-friendly" place: £20-25, 1,000 (ÉCOLE)!') == [
        "a", '"', "kid-friendly", '"', "place", ":", "£20", "-", "25", ",", "1,000", "(", "École", ")", "!",
    ]
    assert mteval_tokenize("  line\nbreaks &amp; entities &quot;x&quot; ") == [
        "line", "breaks", "&", "entities", '"', "x", '"',
    ]
    assert mteval_tokenize("") == []


# ------------------------------------------------------------------------------------------------------------ BLEU


def test_bleu_by_hand():
    predictions = ["The the the cat.", "It's near the river, 5.5 miles away."]
    references = [
        ["The cat is on the mat.", "There is a cat on the mat."],
        ["It is 5.5 miles away, near the river."],
    ]
    # segment 1: hyp  the the the cat .                (5 tokens)
    #            ref1 the cat is on the mat .          (7)    ref2 there is a cat on the mat .  (8)
    #   1-grams: the x3 clipped to 2 (max over refs: ref1 has 2), cat 1, . 1          -> 4 / 5
    #   2-grams: the the x2, the cat, cat .  -> only "the cat" (ref1)                 -> 1 / 4
    #   3-grams: the the the, the the cat, the cat .                                  -> 0 / 3
    #   4-grams: the the the cat, the the cat .                                       -> 0 / 2
    #   closest reference length to 5: 7 (ref2's 8 is farther)
    # segment 2: hyp it's near the river , 5.5 miles away .   (9 tokens; "5.5" stays one token)
    #            ref it is 5.5 miles away , near the river .  (10)
    #   1-grams: all but "it's"                                                       -> 8 / 9
    #   2-grams: near the, the river, 5.5 miles, miles away (not it's near, "river ,", ", 5.5", "away .")
    #                                                                                 -> 4 / 8
    #   3-grams: near the river, 5.5 miles away                                       -> 2 / 7
    #   4-grams: "near the river ," and "5.5 miles away ." differ from the ref's       -> 0 / 6
    # corpus: p1 = 12/14, p2 = 5/12, p3 = 2/10, p4 has no match: mteval smooths it to 1/(2*8) = 1/16
    #   product = (6/7)(5/12)(1/5)(1/16) = 30/6720 = 1/224
    #   brevity penalty: ref length 7 + 10 = 17 > hyp length 14 -> exp(1 - 17/14) = exp(-3/14)
    #   BLEU = 224^(-1/4) * exp(-3/14) = 0.25847 * 0.80712 = 0.20863
    expected = 224 ** -0.25 * math.exp(-3 / 14)
    assert bleu_nist_scores(predictions, references)["BLEU"] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.208629, abs=1e-6)


def test_bleu_perfect_match_is_one():
    # each output equals one of its references: every precision is 1 and that reference is the closest length
    references = [
        ["There is a cheap pub near the river.", "A cheap pub lies near the river."],
        ["Zizzi serves French food.", "French food is served at the Zizzi restaurant in the city centre."],
    ]
    predictions = [references[0][1], references[1][0]]
    assert bleu_nist_scores(predictions, references)["BLEU"] == pytest.approx(1.0, rel=1e-12)


def test_bleu_no_overlap_and_empty_output():
    # no shared word: mteval-v13a's default smoothing (which the official script uses) gives each order with no
    # match 1/(2^k * n-gram count), k = 1, 2, 3, 4: p1 = 1/(2*4), p2 = 1/(4*3), p3 = 1/(8*2), p4 = 1/(16*1);
    # product 1/24576, lengths equal (no brevity penalty): BLEU = 24576^(-1/4) = 0.07987, not 0
    scores = bleu_nist_scores(["xyz abc def ghi"], [["the cat sat down"]])
    assert scores["BLEU"] == pytest.approx(24576**-0.25, rel=1e-12)
    assert scores["NIST"] == 0.0  # no matched n-gram carries information
    # an empty output has no words: the brevity penalty factor is 0 in mteval
    assert bleu_nist_scores([""], [["the cat sat down"]]) == {"BLEU": 0.0, "NIST": 0.0}


def test_scores_ignore_case():
    references = [["The Punter serves Italian food."], ["Aromi is a coffee shop."]]
    lower = bleu_nist_scores(["the punter serves food.", "aromi is a pub."], references)
    upper = bleu_nist_scores(["THE PUNTER serves FOOD.", "Aromi IS a PUB."], references)
    assert lower == upper


# ------------------------------------------------------------------------------------------------------------ NIST


def test_nist_by_hand():
    references = [["the dog runs", "a dog barks"]]
    # information weights from all reference n-grams (6 reference words):
    #   info(the) = log2(6/1), info(dog) = log2(6/2) = log2 3, info(barks) = log2 6
    #   info(the dog) = log2(count(the) / count(the dog)) = log2(1/1) = 0, info(dog barks) = log2(2/1) = 1
    # hyp "the dog barks": every unigram matches: (2 log2 6 + log2 3) / 3 unigrams = 2.25163
    #   bigrams "the dog" (ref1) and "dog barks" (ref2) match: (0 + 1) / 2 = 0.5
    #   trigram "the dog barks" is in no reference: 0 / 1; no 4- or 5-grams: 0 / max(0, 1)
    #   length ratio 3 / (6 words / 2 references) = 1: no penalty; NIST = 2.75163
    nist = (2 * math.log2(6) + math.log2(3)) / 3 + 0.5
    assert bleu_nist_scores(["the dog barks"], references)["NIST"] == pytest.approx(nist, rel=1e-12)
    # hyp "the dog": (log2 6 + log2 3) / 2 = 2.08496 + bigram info 0; length ratio 2/3 = 1/1.5, where NIST's
    # penalty exp(-beta log(ratio)^2) with beta = -log(0.5) / log(1.5)^2 is exactly 0.5: NIST = 1.04248
    nist = (math.log2(6) + math.log2(3)) / 2 * 0.5
    assert bleu_nist_scores(["the dog"], references)["NIST"] == pytest.approx(nist, rel=1e-12)
    assert nist == pytest.approx(1.042481, abs=1e-6)


def test_nist_length_penalty_uses_the_mean_number_of_references_per_segment():
    # mteval-v13a-sig.pl (the official script's copy) counts each segment's non-empty references and passes
    # cum_ref_count / cum_seg_count to nist_score, which divides the total reference words by it: the average
    # reference length is total reference words / mean non-empty references per segment.
    references = [
        ["the cat sat on the mat today"],
        ["a dog ran in the park", "the dog ran in a park", "a dog was running in the park"],
    ]
    predictions = ["the cat sat", "a dog ran"]
    # reference words 7 + 6 + 6 + 7 = 26: the 5, cat 1, sat 1, on 1, mat 1, today 1, a 3, dog 3, ran 2, in 3,
    #   park 3, was 1, running 1; bigrams "the cat" 1, "cat sat" 1, "a dog" 2, "dog ran" 2; trigrams "the cat sat" 1,
    #   "a dog ran" 1
    # unigrams (all 6 match): log2(26/5) + log2(26/1) + log2(26/1) + log2(26/3) + log2(26/3) + log2(26/2), over 6
    # bigrams (all 4 match): the cat log2(5/1), cat sat log2(1/1), a dog log2(3/2), dog ran log2(3/2), over 4
    # trigrams (both match): the cat sat log2(1/1) = 0, a dog ran log2(2/1) = 1, over 2; no 4- or 5-grams: 0
    information = (
        (math.log2(26 / 5) + 2 * math.log2(26) + 2 * math.log2(26 / 3) + math.log2(13)) / 6
        + (math.log2(5) + 2 * math.log2(3 / 2)) / 4
        + 1 / 2
    )
    # average reference length 26 / ((1 + 3) / 2) = 13; system 6 words: ratio 6/13
    # penalty exp(-beta log(6/13)^2), beta = -log(0.5) / log(1.5)^2
    beta = -math.log(0.5) / math.log(1.5) ** 2
    nist = information * math.exp(-beta * math.log(6 / 13) ** 2)
    scores = bleu_nist_scores(predictions, references)
    assert scores["NIST"] == pytest.approx(nist, rel=1e-12)
    assert nist == pytest.approx(0.401398, abs=1e-6)  # the official script prints 0.4014 here
    # (dividing by the largest reference count, 26 / 3, gave ratio 0.69 and NIST 2.8224: short outputs escaped)
    # BLEU: every 1-, 2- and 3-gram matches (6/6, 4/4, 2/2), no 4-grams (precision counted as 1); closest reference
    # lengths 7 and 6 (of 6, 6, 7): brevity penalty exp(1 - 13/6)
    assert scores["BLEU"] == pytest.approx(math.exp(1 - 13 / 6), rel=1e-12)
    assert scores["BLEU"] == pytest.approx(0.311403, abs=1e-6)
    # empty references (the official script pads every MR to the largest count with them) are not counted
    padded = [references[0] + ["", ""], references[1]]
    assert bleu_nist_scores(predictions, padded) == pytest.approx(scores, rel=1e-12)


def test_nist_outputs_as_long_as_the_references_have_no_penalty():
    # two segments with 1 and 2 references: mean 1.5 references, 9 reference words, average length 9 / 1.5 = 6;
    # the outputs have 3 + 3 = 6 words: ratio 1, no penalty (with the largest count 2 it would be 6 / 4.5, also
    # no penalty; longer outputs are never penalised)
    references = [["x y z"], ["p q r", "p q s"]]
    # words: x y z p q r p q s; info(x) = info(y) = info(z) = info(r) = info(s) = log2 9, info(p) = info(q) = log2 4.5
    #   bigrams: x y log2(1/1) = 0, y z 0, p q log2(2/2) = 0, q r log2(2/1) = 1; trigrams x y z 0, p q r log2(2/1) = 1
    # hyp "x y z": unigrams 3 log2 9; hyp "p q r": 2 log2 4.5 + log2 9; over 6 unigrams
    # bigrams (0 + 0 + 0 + 1) / 4; trigrams (0 + 1) / 2
    nist = (4 * math.log2(9) + 2 * math.log2(4.5)) / 6 + 1 / 4 + 1 / 2
    assert bleu_nist_scores(["x y z", "p q r"], references)["NIST"] == pytest.approx(nist, rel=1e-12)


def test_input_checks():
    with pytest.raises(ValueError, match="reference lists"):
        bleu_nist_scores(["a b"], [["a b"], ["c"]])
    with pytest.raises(ValueError, match="non-empty list"):
        bleu_nist_scores(["a b"], ["a b"])  # a string where the list of references belongs
    with pytest.raises(ValueError, match="non-empty list"):
        bleu_nist_scores(["a b"], [[]])


# ------------------------------------------------------------------------------------- METEOR, ROUGE-L, CIDEr-D


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(e2e_metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install default-jre-headless"):
        e2e_scores(["a cheap pub"], [["a cheap pub"]])


@needs_java
def test_broken_meteor_jar_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(e2e_metrics, "_meteor", None)  # a fresh scorer; the shared one comes back afterwards
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.METEOR_JAR", "missing-meteor.jar")
    with pytest.raises(RuntimeError, match="METEOR 1.5 jar returned no score.*missing-meteor.jar"):
        coco_scores(["a cheap pub"], [["a cheap pub"]])
    assert e2e_metrics._meteor is None  # the next call starts a new process


@needs_java
def test_rouge_l_by_hand():
    # the PTB tokenizer lowercases and drops the punctuation tokens, leaving
    #   hyp 1 "the cat sat on the mat" (6)  refs "the cat is on the mat today" (7), "cat sat" (2)
    #     LCS with ref1 = "the cat on the mat" = 5: P = 5/6, R = 5/7;  with ref2 = "cat sat" = 2: P = 2/6, R = 1
    #     max P = 5/6 (ref1), max R = 1 (ref2): F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 (5/6) / 2.2 = 0.92424
    #   hyp 2 "a red car"  ref "the blue car": LCS 1, P = R = 1/3, F = 1/3
    #   ROUGE_L = mean over segments = (0.92424 + 0.33333) / 2 = 0.62879
    scores = coco_scores(
        ["The cat sat on the mat.", "A red car!"], [["The cat is on the mat today.", "Cat sat."], ["The blue car."]]
    )
    first = 2.44 * (5 / 6) * 1 / (1 + 1.44 * 5 / 6)
    assert scores["ROUGE_L"] == pytest.approx((first + 1 / 3) / 2, rel=1e-9)
    assert set(scores) == {"METEOR", "ROUGE_L", "CIDEr"}


@needs_java
def test_coco_metrics_order_systems():
    references = [
        ["The Eagle is a cheap coffee shop near Burger King.", "Near Burger King there is a cheap coffee shop."],
        ["Zizzi is a family friendly pub in the city centre.", "The family friendly pub Zizzi is in the centre."],
        ["Aromi serves Italian food by the river.", "By the riverside, Aromi offers Italian food."],
    ]
    exact = [refs[0] for refs in references]
    paraphrase = [
        "The Eagle is a low priced coffee shop close to Burger King.",
        "Zizzi is a pub for families in the city centre.",
        "Aromi is an Italian place near the river.",
    ]
    unrelated = ["Green ideas sleep furiously", "Cold winds blow today", "Trains leave at noon"]  # no shared token
    scores = [e2e_scores(system, references) for system in (exact, paraphrase, unrelated)]
    for result in scores:
        assert tuple(result) == E2E_METRIC_NAMES
    for name in E2E_METRIC_NAMES:
        assert scores[0][name] > scores[1][name] > scores[2][name], name
    assert scores[0]["METEOR"] > 0.9 and scores[0]["ROUGE_L"] == pytest.approx(1.0)
    # no shared token; METEOR stays just above 0 through its stem and paraphrase matches
    assert scores[2]["ROUGE_L"] == scores[2]["CIDEr"] == scores[2]["NIST"] == 0.0 and scores[2]["METEOR"] < 0.05


@needs_java
def test_the_ptb_tokenizer_prints_nothing_on_the_console(capfd):
    """Its Java process writes a line of token counts per call to the inherited stderr: kept off the console."""
    scores = coco_scores(["the cheap pub"], [["a cheap pub", "the pub is cheap"]])
    assert 0 < scores["ROUGE_L"] <= 1
    assert capfd.readouterr().err == ""


@needs_java
def test_a_failing_ptb_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    """pycocoevalcap ignores the jar's exit status and would hand the scorers a partial set of segments."""
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'Error: could not find or load main class' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="PTB tokenizer .* too few lines; its error output: Error: could not find"):
        coco_scores(["the cheap pub", "a pub"], [["a cheap pub"], ["the pub"]])


# --------------------------------------------------------------------------------------------------------- readers


def test_read_official_csv(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text(
        "mr,ref\n"
        '"name[Aromi], eatType[pub]","Aromi is a pub."\n'
        '"name[Aromi], eatType[pub]"," The ""Aromi"" pub, by the river. "\n'
        '"name[Zizzi], food[French]","Zizzi serves French food."\n',
        encoding="utf-8",
    )
    mrs, refs = read_e2e_file(path)
    assert mrs == ["name[Aromi], eatType[pub]", "name[Aromi], eatType[pub]", "name[Zizzi], food[French]"]
    assert refs == ["Aromi is a pub.", 'The "Aromi" pub, by the river.', "Zizzi serves French food."]


def test_read_lora_layout(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text(
        "name : Aromi | eat type : pub||Aromi is a pub . \n"
        "name : Aromi | eat type : pub||There is a pub called Aromi . \n"
        "\n"
        "name : Zizzi | food : French||Zizzi serves French food . \n",
        encoding="utf-8",
    )
    mrs, refs = read_e2e_file(path)
    assert mrs == ["name : Aromi | eat type : pub"] * 2 + ["name : Zizzi | food : French"]
    assert refs == ["Aromi is a pub .", "There is a pub called Aromi .", "Zizzi serves French food ."]


def test_read_rejects_unknown_or_broken_files(tmp_path):
    mr_only = tmp_path / "testset.csv"
    mr_only.write_text('MR\n"name[Aromi], eatType[pub]"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"holds meaning representations without references \(an 'MR' column "
                       r"only\): it can be neither trained on nor scored; use a file with references"):
        read_e2e_file(mr_only)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.csv is empty: an E2E split needs a 'mr,ref' header"):  # "unknown layout"
        read_e2e_file(empty)
    unknown = tmp_path / "other.csv"
    unknown.write_text('meaning,text\n"name[Aromi]","Aromi."\n', encoding="utf-8")
    with pytest.raises(ValueError, match="unknown E2E layout"):
        read_e2e_file(unknown)
    short_row = tmp_path / "bad.csv"
    short_row.write_text('mr,ref\n"name[Aromi]"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected 2 fields"):
        read_e2e_file(short_row)
    no_separator = tmp_path / "bad.txt"
    no_separator.write_text("name : Aromi||Aromi is a pub .\nname : Zizzi Zizzi serves food .\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: no '\\|\\|'"):
        read_e2e_file(no_separator)
    empty_reference = tmp_path / "noref.csv"
    empty_reference.write_text('mr,ref\n"name[Aromi]","Aromi."\n"name[Zizzi]"," "\n', encoding="utf-8")
    with pytest.raises(ValueError, match="noref.csv, line 3: the reference is empty; fill or remove that row"):
        read_e2e_file(empty_reference)
    empty_mr = tmp_path / "nomr.txt"
    empty_mr.write_text("name : Aromi||Aromi is a pub .\n ||Zizzi serves food .\n", encoding="utf-8")
    with pytest.raises(ValueError, match="nomr.txt, line 2: the meaning representation is empty"):
        read_e2e_file(empty_mr)


def test_group_references_first_seen_order():
    mrs = ["B", "B", "A", "C", "A"]
    refs = ["b1", "b2", "a1", "c1", "a2"]
    assert group_references(mrs, refs) == (["B", "A", "C"], [["b1", "b2"], ["a1", "a2"], ["c1"]])
    with pytest.raises(ValueError):
        group_references(mrs, refs[:-1])


# ------------------------------------------------------------------------------------------- real E2E dev set


@pytest.fixture(scope="module")
def devset_first_vs_rest():
    """The dev set grouped by MR; each MR's first reference scored as a system output against the others."""
    mrs, refs = read_e2e_file(DATA / "e2e" / "devset.csv")
    assert len(mrs) == 4672
    unique_mrs, grouped = group_references(mrs, refs)
    assert len(unique_mrs) == 547 and min(map(len, grouped)) >= 2
    return [g[0] for g in grouped], [g[1:] for g in grouped]


@needs_data
def test_devset_layouts_agree():
    csv_mrs, csv_refs = read_e2e_file(DATA / "e2e" / "devset.csv")
    txt_mrs, txt_refs = read_e2e_file(DATA / "e2e" / "valid.txt")
    assert len(txt_mrs) == len(csv_mrs) == 4672
    assert [len(g) for g in group_references(txt_mrs, txt_refs)[1]] == [
        len(g) for g in group_references(csv_mrs, csv_refs)[1]
    ]


@needs_data
def test_devset_bleu_nist(devset_first_vs_rest):
    # Values printed by the official script's mteval-v13a-sig.pl on the same input (fed as measure_scores.py does).
    scores = bleu_nist_scores(*devset_first_vs_rest)
    assert scores["BLEU"] == pytest.approx(0.59953459, abs=1e-8)
    assert scores["NIST"] == pytest.approx(8.57890591, abs=1e-7)



@pytest.mark.slow
@needs_data
@needs_java
def test_devset_all_metrics_plausible(devset_first_vs_rest):
    scores = e2e_scores(*devset_first_vs_rest)
    # human references against each other: roughly the range E2E systems reach
    assert 0.5 < scores["BLEU"] < 0.7
    assert 7.5 < scores["NIST"] < 9.5
    assert 0.35 < scores["METEOR"] < 0.55
    assert 0.55 < scores["ROUGE_L"] < 0.75
    assert 1.3 < scores["CIDEr"] < 2.6


@needs_java
def test_the_meteor_jar_is_stopped_at_exit_while_the_interpreter_is_whole(monkeypatch):
    """The scorer, kept for the session, was left to the interpreter's teardown, where its __del__ fails (its
    `signal` global already gone) and printed a traceback after a training run's last line: an exit hook drops it,
    which runs its __del__ there and then."""
    monkeypatch.setattr(e2e_metrics, "_meteor", None)  # a scorer of this test's own
    coco_scores(["the cheap pub"], [["a cheap pub", "the pub is cheap"]])
    process = e2e_metrics._meteor.meteor_p
    assert process.poll() is None
    e2e_metrics._release_meteor()  # what atexit runs
    assert e2e_metrics._meteor is None and process.poll() is not None


def test_a_prediction_is_one_line_of_the_file_the_official_script_reads():
    """A form feed (and the other line boundaries str.splitlines knows) inside an output made the predictions file
    one line longer than the MRs, shifting every later prediction for the official script (walk AO)."""
    from kasa.tasks.e2e import first_line

    outputs = ["The Eagle is a pub.\nSecond line", "A cafe\x0cnear the river", "x\u2028y", "  \n", ""]
    predictions = [first_line(text) for text in outputs]
    assert predictions == ["The Eagle is a pub.", "A cafe", "x", "", ""]
    assert ("\n".join(predictions) + "\n").splitlines() == predictions
