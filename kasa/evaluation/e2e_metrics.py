"""The E2E NLG Challenge metrics, computed as the official script (tuetschek/e2e-metrics `measure_scores.py`) does,
but offline and without Perl.

The official script scores BLEU and NIST with the Perl `mteval-v13a` and METEOR, ROUGE-L and CIDEr-D with the COCO
caption evaluation code. BLEU and NIST are reimplemented here in plain Python, following mteval-v13a's defaults as
the official script calls it (lowercasing, its western-language tokenisation, BLEU over 1..4-grams with the
closest-reference brevity penalty and its smoothing of zero n-gram matches, NIST over 1..5-grams), including how the
official script hands multi-reference data to mteval: it pads every segment to the largest reference count with
empty references, which its mteval-v13a-sig.pl does not count when it averages the reference length for NIST's
length penalty (total reference words / mean number of non-empty references per segment). METEOR 1.5, ROUGE-L
(beta 1.2) and CIDEr-D come from the `pycocoevalcap` package, after its Stanford PTB tokenizer (lowercasing,
punctuation removal), exactly as the official script runs them; those three need a Java runtime.

Scales are the official script's: BLEU, METEOR and ROUGE_L in 0..1 (papers report them x100), NIST around 8,
CIDEr around 2 on E2E (kasa.evaluation.metrics.UNSCALED_METRICS: papers print them as they are)."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from typing import Any, Iterator, Sequence

from kasa.extras import install_extra

E2E_METRIC_NAMES: tuple[str, ...] = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

BLEU_MAX_N = 4
NIST_MAX_N = 5

JAVA_HINT = (
    "METEOR, ROUGE-L and CIDEr (pycocoevalcap's METEOR 1.5 jar and its PTB tokenizer) need a Java runtime on "
    "PATH, and `java` was not found: install one (Debian/Ubuntu: apt-get install default-jre-headless)"
)
PYCOCOEVALCAP_HINT = f"METEOR, ROUGE-L and CIDEr need the pycocoevalcap package: {install_extra('e2e')}"

# mteval-v13a `tokenization` (its default, non-international rules), in the order the script applies them.
_SGML_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))
# mteval lowercases with `tr/[A-Z]/[a-z]/`: ASCII letters only, so accented capitals keep their case.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Every ASCII symbol except the apostrophe, hyphen, period and comma: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * +
# : ; < = > ? @ /
_PUNCTUATION = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([\.,])")
_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([\.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_WHITESPACE = re.compile(r"\s+")

# NIST's length penalty is exp(-beta * log(ratio)^2), with beta set so that a ratio of 1.5 (read as 1/1.5) scores 0.5.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def mteval_tokenize(text: str) -> list[str]:
    """Tokens of `text` as mteval-v13a's default `tokenization` produces them for BLEU and NIST.

    The official script writes each segment into an SGML file, where mteval first collapses all whitespace (line
    breaks included) to single spaces; then it strips `<skipped>`, converts the four SGML entities, lowercases ASCII
    letters, splits off every ASCII symbol but `'`, `-`, `.` and `,`, splits `.` and `,` unless they sit between
    digits (so "5.5" and "1,000" stay whole), and splits a `-` that follows a digit ("20-25" -> "20 - 25")."""
    text = _WHITESPACE.sub(" ", text)
    text = text.replace("<skipped>", "")
    for entity, char in _SGML_ENTITIES:
        text = text.replace(entity, char)
    text = f" {text} ".translate(_ASCII_LOWER)
    text = _PUNCTUATION.sub(r" \1 ", text)
    text = _PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return text.split()


def _ngrams(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..max_n-gram of `tokens`."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _closest_length(hyp_length: int, ref_lengths: Sequence[int]) -> int:
    """mteval's closest reference length for the brevity penalty: folded over the references in order, a tie goes
    to the shorter one, and empty references after the first are skipped (they are the official script's padding)."""
    best = ref_lengths[0]
    for length in ref_lengths[1:]:
        if length == 0:
            continue
        if abs(hyp_length - length) < abs(hyp_length - best) or (
            abs(hyp_length - length) == abs(hyp_length - best) and length < best
        ):
            best = length
    return best


def _nist_information(ref_ngrams: Sequence[Sequence[Counter[tuple[str, ...]]]]) -> dict[tuple[str, ...], float]:
    """NIST information weight of every reference n-gram w1..wn: log2(count(w1..wn-1) / count(w1..wn)), counted
    over all references of all segments (for unigrams the context count is the total number of reference words).
    `ref_ngrams` holds each reference's n-gram counts, per segment."""
    counts: Counter[tuple[str, ...]] = Counter()
    for segment in ref_ngrams:
        for ref in segment:
            counts.update(ref)
    total_words = sum(count for ngram, count in counts.items() if len(ngram) == 1)
    return {
        ngram: math.log2((counts[ngram[:-1]] if len(ngram) > 1 else total_words) / count)
        for ngram, count in counts.items()
    }


def _nist_length_penalty(ratio: float) -> float:
    """NIST's brevity penalty on (system words / average reference words): 1 from a ratio of 1 up, 0.5 at 2/3."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def bleu_nist_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (4-gram) and NIST (5-gram) as the official E2E script gets them from mteval-v13a.

    BLEU sums clipped n-gram matches, system n-gram counts and closest reference lengths over all segments, then
    takes exp(mean log precision) times the brevity penalty exp(min(0, 1 - ref_len / sys_len)); like mteval's
    default it smooths an order with no match to 1 / (2^k * system n-grams) (k counting such orders) and counts an
    order the system has no n-grams of as precision 1, so it is 0 only for an empty output. NIST sums, per order,
    the information of the matched n-grams over the system n-gram count, times its length penalty on the system
    length over the average reference length: the total reference words divided by the mean number of non-empty
    references per segment (mteval-v13a-sig.pl counts a segment's references that are not empty after
    tokenisation, so the official script's empty padding references do not count)."""
    _check_inputs(predictions, references)
    hyps = [mteval_tokenize(p) for p in predictions]
    refs = [[mteval_tokenize(r) for r in segment_refs] for segment_refs in references]
    max_n = max(BLEU_MAX_N, NIST_MAX_N)
    ref_ngrams = [[_ngrams(ref, max_n) for ref in segment_refs] for segment_refs in refs]
    information = _nist_information(ref_ngrams)

    matches, hyp_counts = [0] * (max_n + 1), [0] * (max_n + 1)  # index n: n-grams (index 0 unused)
    nist_info = [0.0] * (max_n + 1)
    ref_length = 0
    for hyp, segment_refs, segment_ngrams in zip(hyps, refs, ref_ngrams):
        hyp_ngrams = _ngrams(hyp, max_n)
        ref_max: Counter[tuple[str, ...]] = Counter()
        for counts in segment_ngrams:
            ref_max |= counts  # | keeps the larger count: clipping uses the max over the references
        for n in range(1, max_n + 1):
            hyp_counts[n] += max(len(hyp) - n + 1, 0)
        for ngram, count in hyp_ngrams.items():
            clipped = min(count, ref_max[ngram])
            if clipped:
                matches[len(ngram)] += clipped
                nist_info[len(ngram)] += information[ngram] * clipped
        ref_length += _closest_length(len(hyp), [len(ref) for ref in segment_refs])

    bleu = _smoothed_bleu(matches, hyp_counts, ref_length)
    ref_words = sum(len(ref) for segment_refs in refs for ref in segment_refs)
    if ref_words == 0:
        raise ValueError("the references contain no words")
    mean_ref_count = sum(1 for segment_refs in refs for ref in segment_refs if ref) / len(refs)
    nist = sum(nist_info[n] / max(hyp_counts[n], 1) for n in range(1, NIST_MAX_N + 1))
    nist *= _nist_length_penalty(hyp_counts[1] / (ref_words / mean_ref_count))
    return {"BLEU": bleu, "NIST": nist}


def _smoothed_bleu(matches: Sequence[int], hyp_counts: Sequence[int], ref_length: int) -> float:
    """mteval-v13a's `bleu_score` (its default, smoothed) on corpus totals indexed by n-gram order."""
    if hyp_counts[1] == 0:
        return 0.0
    log_precision_sum = 0.0
    smooth = 1
    for n in range(1, BLEU_MAX_N + 1):
        if hyp_counts[n] == 0:
            continue  # log precision 0
        if matches[n] == 0:
            smooth *= 2
            log_precision_sum += math.log(1.0 / (smooth * hyp_counts[n]))
        else:
            log_precision_sum += math.log(matches[n] / hyp_counts[n])
    brevity = math.exp(min(0.0, 1.0 - ref_length / hyp_counts[1]))
    return math.exp(log_precision_sum / BLEU_MAX_N) * brevity


def coco_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR 1.5, ROUGE-L and CIDEr-D from pycocoevalcap, as the official script's COCO evaluator runs them: the
    Stanford PTB tokenizer (Java; lowercases and drops punctuation tokens) on references and outputs, then each
    scorer, averaged over segments. Calls the scorers directly instead of `COCOEvalCap`, whose pip release would
    also run SPICE (which downloads Stanford models) and a differently tokenised BLEU."""
    _check_inputs(predictions, references)
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_HINT)
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise ImportError(PYCOCOEVALCAP_HINT) from err

    # The PTB tokenizer runs with -preserveLines over one caption per line; a line break inside a caption would
    # shift every later caption onto the wrong segment, so it becomes a space (the official wrapper strips lines).
    gts = {i: [{"caption": " ".join(ref.split())} for ref in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": " ".join(pred.split())}] for i, pred in enumerate(predictions)}
    tokenizer = PTBTokenizer()
    with _stderr_of_child_processes() as child_stderr:
        tokenized = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        # pycocoevalcap reads the jar's output without its exit status: a jar that failed returns too few lines
        if any(len(out.get(i, ())) != len(captions) for given, out in zip((gts, res), tokenized)
               for i, captions in given.items()):
            child_stderr.seek(0)
            said = child_stderr.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"the PTB tokenizer (Java) returned too few lines; its error output: {said or '(none)'}")
    gts, res = tokenized
    return {
        "METEOR": _meteor_score(gts, res),
        "ROUGE_L": float(Rouge().compute_score(gts, res)[0]),
        "CIDEr": float(Cider().compute_score(gts, res)[0]),
    }


@contextlib.contextmanager
def _stderr_of_child_processes() -> Iterator[Any]:
    """File descriptor 2 pointed at a temporary file, which is yielded: the PTB tokenizer's Java process inherits it
    and prints a line of token counts per call, which would land on the user's console at every evaluation."""
    sys.stderr.flush()
    console = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(console, 2)
            os.close(console)


_meteor: Any = None  # the running pycocoevalcap Meteor scorer, see _meteor_score


@atexit.register
def _release_meteor() -> None:
    """Drop the scorer while the interpreter still has its modules: its __del__ kills the jar through
    subprocess.Popen.kill, which at interpreter shutdown (its `signal` global gone) printed a traceback after the
    run's last line."""
    global _meteor
    _meteor = None


def _meteor_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR from one METEOR process kept for the whole Python session: starting the jar loads its 60 MB
    paraphrase table, which takes tens of seconds, and evaluating after every epoch would pay that each time. A
    process that has died is replaced; the last one is killed at exit (`_release_meteor`)."""
    from pycocoevalcap.meteor.meteor import Meteor

    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        _meteor = Meteor()
    try:
        return float(_meteor.compute_score(gts, res)[0])
    except (ValueError, OSError) as err:  # an empty answer or a broken pipe: the jar failed to start or died
        scorer, _meteor = _meteor, None
        if scorer.lock.locked():  # compute_score raised holding it; the scorer's __del__ would wait on it forever
            scorer.lock.release()
        scorer.meteor_p.kill()
        stderr = scorer.meteor_p.stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"the METEOR 1.5 jar returned no score; its error output: {stderr or '(none)'}") from err


def e2e_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The five official E2E metrics of `predictions` (one output per MR) against `references` (all references of
    each MR, see `group_references`): BLEU, NIST, METEOR, ROUGE_L, CIDEr on the official script's scales."""
    coco = coco_scores(predictions, references)  # first: a missing Java runtime fails before the slower BLEU/NIST
    scores = {**bleu_nist_scores(predictions, references), **coco}
    return {name: scores[name] for name in E2E_METRIC_NAMES}


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Reject the mistakes that would otherwise give a silently wrong score (a string where a list of references
    belongs is iterated character by character)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists; one list per MR")
    if not predictions:
        raise ValueError("no predictions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of reference strings")


def group_references(mrs: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The distinct MRs in first-seen order and, for each, all its references: the E2E files hold one
    (MR, reference) pair a row, while a system produces one output per MR and is scored against all of them. (The
    official script groups consecutive identical MRs; the E2E files keep each MR's rows together, so both agree.)"""
    if len(mrs) != len(refs):
        raise ValueError(f"{len(mrs)} MRs but {len(refs)} references")
    grouped: dict[str, list[str]] = {}
    for mr, ref in zip(mrs, refs):
        grouped.setdefault(mr, []).append(ref)
    return list(grouped), list(grouped.values())
