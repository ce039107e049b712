"""GLUE loading from small files the tests write (every GLUE layout the loader claims to read), from a stubbed Hub,
tokenization, the bad inputs' errors, and, when the shared folder is there, the real GLUE files."""

from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import BertTokenizerFast

from kasa.config import TaskConfig
from kasa.data import DEMO_DATA_DIR, DataError, encode_glue, load_glue_splits

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def task(data_dir: Path, **overrides) -> TaskConfig:
    return TaskConfig(name="test", data_dir=str(data_dir), **overrides)


@pytest.fixture
def sst2(tmp_path: Path) -> Path:
    rows = [f"review number {i} with a \"quote\t{i % 2}" for i in range(20)]
    write(tmp_path / "train.tsv", ["sentence\tlabel", *rows])
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "it 's \"fine\" . \t1", "bad 'n' dull\t0", "good movie\t1"])
    return tmp_path


@pytest.fixture
def tokenizer(tmp_path: Path) -> BertTokenizerFast:
    words = ["a", "good", "bad", "movie", "is", "was", "the", "review", "number", "with", "quote", "it", "fine"]
    folder = tmp_path / "tokenizer"
    write(folder / "vocab.txt", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *map(str, range(20))])
    return BertTokenizerFast.from_pretrained(folder)  # a local folder: no Hub access


# --- layouts ------------------------------------------------------------------------------------------------------


def test_sst2_header_and_quotes(sst2: Path) -> None:
    splits = load_glue_splits(task(sst2))
    assert list(splits) == ["train", "validation"]
    assert splits["train"].column_names == ["sentence", "label"]
    assert splits["train"].features["label"].dtype == "int64"
    assert splits["validation"][0] == {"sentence": "it 's \"fine\" . ", "label": 1}  # quotes kept verbatim
    assert splits["train"]["label"][:4] == [0, 1, 0, 1]


def test_cola_headerless(tmp_path: Path) -> None:
    cola = ["gj04\t1\t\tThe sailors rode the \"breeze\".", "gj04\t0\t*\tThe rope stretched the weights it."]
    write(tmp_path / "train.tsv", cola)
    write(tmp_path / "in_domain_dev.tsv", cola[::-1])
    splits = load_glue_splits(task(tmp_path, eval_split="in_domain_dev"))  # a split named by its file stem
    assert splits["train"].to_list() == [
        {"sentence": "The sailors rode the \"breeze\".", "label": 1},
        {"sentence": "The rope stretched the weights it.", "label": 0},
    ]
    assert splits["in_domain_dev"]["label"] == [0, 1]


def test_stsb_regression(tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    rows = [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\tA man {i}.\tA person {i}.\t{i * 1.25:.3f}"
            for i in range(4)]
    write(tmp_path / "train.tsv", [header + "\tscore", *rows])
    write(tmp_path / "dev.tsv", [header + "\tscore", *rows[:2]])
    write(tmp_path / "test.tsv", [header, *(row.rsplit("\t", 1)[0] for row in rows)])  # GLUE test: no score
    config = task(tmp_path, text_fields=["sentence1", "sentence2"], label_field="score", num_labels=1)
    splits = load_glue_splits(config)
    train = splits["train"]
    assert train.column_names == ["sentence1", "sentence2", "label"]
    assert train.features["label"].dtype == "float32"
    assert train["label"] == [0.0, 1.25, 2.5, 3.75]
    assert train[1]["sentence2"] == "A person 1."
    with pytest.raises(DataError, match="split 'test' .* has no labels \\(no 'score' column.*choose another split"):
        load_glue_splits(task(tmp_path, text_fields=["sentence1", "sentence2"], label_field="score", num_labels=1,
                              eval_split="test"))


def test_rte_string_labels_follow_hub_order(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA b.\tA.\tentailment",
                                   "1\tC d.\tE.\tnot_entailment", "2\tF.\tG.\t1"])
    write(tmp_path / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tnot_entailment"])
    splits = load_glue_splits(task(tmp_path, text_fields=["sentence1", "sentence2"]))
    assert splits["train"]["label"] == [0, 1, 1]  # entailment = 0, not_entailment = 1, as nyu-mll/glue
    assert splits["validation"]["label"] == [1]


def test_mnli_three_labels_and_dev_matched(tmp_path: Path) -> None:
    header = "index\tpremise\thypothesis\tlabel"
    write(tmp_path / "train.tsv", [header, "0\tP.\tH.\tentailment", "1\tP.\tH.\tneutral", "2\tP.\tH.\tcontradiction"])
    write(tmp_path / "dev_matched.tsv", [header, "0\tP.\tH.\tcontradiction"])
    splits = load_glue_splits(task(tmp_path, text_fields=["premise", "hypothesis"], num_labels=3))
    assert splits["train"]["label"] == [0, 1, 2]
    assert splits["validation"]["label"] == [2]  # validation -> dev_matched.tsv when there is no dev.tsv


def test_csv_file(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", ["sentence,label", '"good, really",1', "bad,0"])
    write(tmp_path / "dev.csv", ["sentence,label", "fine,1"])
    assert load_glue_splits(task(tmp_path))["train"]["sentence"] == ["good, really", "bad"]


def test_demo_data_is_balanced_and_loads() -> None:
    splits = load_glue_splits(task(DEMO_DATA_DIR))
    assert (len(splits["train"]), len(splits["validation"])) == (800, 200)
    assert sum(splits["train"]["label"]) == 400 and sum(splits["validation"]["label"]) == 100
    assert not set(splits["train"]["sentence"]) & set(splits["validation"]["sentence"])


# --- labels and subsampling ---------------------------------------------------------------------------------------


def test_unlabeled_rows_are_dropped_but_an_unlabeled_split_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t1", "b\t-1", "c\t", "d\t0"])
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "a\t1"])
    write(tmp_path / "test.tsv", ["sentence\tlabel", "a\t-1", "b\t-1"])
    assert load_glue_splits(task(tmp_path))["train"]["sentence"] == ["a", "d"]
    with pytest.raises(DataError, match="split 'test' .* has no labels .*choose another split"):
        load_glue_splits(task(tmp_path, eval_split="test"))


def test_training_reads_the_checked_eval_split_once(tmp_path: Path, tokenizer, caplog) -> None:
    """kasa-train checks the eval split before the model loads, then trains and evaluates on it: one read, so its
    warnings (dropped rows) are printed once."""
    from kasa.config import RunConfig
    from kasa.tasks import build_task

    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t1", "b\t0"])
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "a\t1", "b\t-1"])
    cfg = RunConfig()
    cfg.task.data_dir = str(tmp_path)
    glue = build_task(cfg)
    with caplog.at_level("WARNING", logger="kasa"):
        glue.check_evaluation("validation")
        assert len(glue.train_dataset(tokenizer)) == 2
        assert len(glue._split(tokenizer, "validation", evaluated=True)) == 1
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == ["split 'validation' (%s): dropped 1 unlabeled rows of 2" % (tmp_path / "dev.tsv")]


def test_an_evaluated_training_split_is_cut_to_max_eval_samples(sst2: Path, tokenizer) -> None:
    """kasa-eval split=train scored max_train_samples rows (all of SST-2's 67K when unset) while its console line and
    eval_train.json said max_eval_samples (walk AK): evaluated, every split is cut to max_eval_samples."""
    from kasa.config import RunConfig
    from kasa.tasks import build_task

    assert len(load_glue_splits(task(sst2, max_train_samples=5, max_eval_samples=2), ["train"], evaluated=True)[
        "train"]) == 2
    cfg = RunConfig()
    cfg.task = task(sst2, max_train_samples=5, max_eval_samples=2)
    glue = build_task(cfg)
    glue.check_evaluation("train")
    assert len(glue._split(tokenizer, "train", evaluated=True)) == 2
    assert len(glue.train_dataset(tokenizer)) == 5


def test_subsampling_is_deterministic(sst2: Path) -> None:
    first = load_glue_splits(task(sst2, max_train_samples=5, max_eval_samples=1))
    second = load_glue_splits(task(sst2, max_train_samples=5, max_eval_samples=1))
    assert (len(first["train"]), len(first["validation"])) == (5, 1)
    assert first["train"].to_list() == second["train"].to_list()
    full = load_glue_splits(task(sst2, max_train_samples=100))  # a limit above the size keeps every row, in order
    assert full["train"].to_list()[:3] == load_glue_splits(task(sst2))["train"].to_list()[:3]
    assert len(full["train"]) == 20
    assert set(first["train"]["sentence"]) <= set(full["train"]["sentence"])
    assert first["train"]["sentence"] != full["train"]["sentence"][:5]  # shuffled before the cut
    with pytest.raises(DataError, match="max samples for split 'train' is 0"):
        load_glue_splits(task(sst2, max_train_samples=0))


def test_explicit_splits(sst2: Path) -> None:
    write(sst2 / "test.tsv", ["sentence\tlabel", *(f"t{i}\t{i % 2}" for i in range(6))])
    config = task(sst2, max_train_samples=3, max_eval_samples=2)
    splits = load_glue_splits(config, ["test"])  # kasa-eval loads just the split it evaluates
    assert list(splits) == ["test"] and len(splits["test"]) == 2  # any split but the train split: the eval limit
    both = load_glue_splits(config, ["train", "test"])
    assert (len(both["train"]), len(both["test"])) == (3, 2)


# --- tokenization -------------------------------------------------------------------------------------------------


def test_encode_single_sentence(sst2: Path, tokenizer: BertTokenizerFast) -> None:
    config = task(sst2)
    encoded = encode_glue(load_glue_splits(config), tokenizer, config, max_length=6)
    train = encoded["train"]
    assert set(train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert train["labels"][:2] == [0, 1]
    assert all(len(ids) <= 6 for ids in train["input_ids"])
    assert len(train[0]["input_ids"]) == 6  # truncated to max_length
    short = encoded["validation"][2]  # not padded: the collator pads each batch
    assert tokenizer.convert_ids_to_tokens(short["input_ids"]) == ["[CLS]", "good", "movie", "[SEP]"]
    assert short["attention_mask"] == [1, 1, 1, 1]


def test_encode_pair_regression(tmp_path: Path, tokenizer: BertTokenizerFast) -> None:
    write(tmp_path / "train.tsv", ["sentence1\tsentence2\tlabel", "the movie\tthe review\t4.5"])
    write(tmp_path / "dev.tsv", ["sentence1\tsentence2\tlabel", "good\tbad\t0.5"])
    config = task(tmp_path, text_fields=["sentence1", "sentence2"], num_labels=1)
    encoded = encode_glue(load_glue_splits(config), tokenizer, config, max_length=32)
    row = encoded["validation"].with_format("numpy")[0]
    assert tokenizer.convert_ids_to_tokens(row["input_ids"].tolist()) == ["[CLS]", "good", "[SEP]", "bad", "[SEP]"]
    assert row["token_type_ids"].tolist() == [0, 0, 0, 1, 1]
    assert row["labels"].dtype == np.float32 and row["labels"] == pytest.approx(0.5)


# --- errors ---------------------------------------------------------------------------------------------------------


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="task.data_dir=.*nowhere' is not a folder.*train.tsv and dev.tsv"):
        load_glue_splits(task(tmp_path / "nowhere"))


def test_missing_split_file_lists_files(sst2: Path) -> None:
    with pytest.raises(DataError, match="no file for split 'validation_mismatched'.*found \\['dev.tsv', "
                                        "'train.tsv'\\].*task.train_split / task.eval_split"):
        load_glue_splits(task(sst2, eval_split="validation_mismatched"))


def test_a_split_naming_a_missing_file_says_where_it_looked_and_what_to_set(tmp_path: Path, monkeypatch) -> None:
    """The instruction recipes' MT-Bench question file is a relative path: offline, the error named neither the
    folder it was looked for in nor the setting that names it."""
    from kasa.data.sources import local_split_file

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"^split 'mt_bench/question.jsonl' names a file that does not exist in "
                                        f"{tmp_path}: set task.eval_split / task.train_split \\(kasa-eval: split=\\) to "
                                        "the path of an existing file$"):
        local_split_file(None, "mt_bench/question.jsonl", [])
    with pytest.raises(DataError, match=f"^split '{tmp_path / 'q.json'}' names a file that does not exist: set"):
        local_split_file(None, str(tmp_path / "q.json"), [])
    assert local_split_file(None, "validation", []) is None  # a Hub split


def test_empty_split(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t1"])
    write(tmp_path / "dev.tsv", ["sentence\tlabel"])
    with pytest.raises(DataError, match="split 'validation' .*dev.tsv.* has no rows"):
        load_glue_splits(task(tmp_path))
    (tmp_path / "dev.tsv").write_text("")
    with pytest.raises(DataError, match="dev.tsv is empty"):
        load_glue_splits(task(tmp_path))


def test_wrong_columns(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["text\tlabel", "a\t1"])
    write(tmp_path / "dev.tsv", ["text\tlabel", "a\t1"])
    with pytest.raises(DataError, match="lacks text column\\(s\\) \\['sentence'\\]; found columns \\['text', 'label'\\]"
                                        ".*task.text_fields=\\['sentence'\\] and task.label_field='label'"):
        load_glue_splits(task(tmp_path))
    assert load_glue_splits(task(tmp_path, text_fields=["text"]))["train"]["text"] == ["a"]
    write(tmp_path / "train.tsv", ["text\ttarget", "a\t1"])
    with pytest.raises(DataError, match="names none of the expected columns \\['label', 'sentence'\\]"):
        load_glue_splits(task(tmp_path))


def test_bad_rows_and_labels(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "a\t1"])
    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t1", "b\twith\ttab\t0"])
    with pytest.raises(DataError, match="train.tsv, line 3: 4 fields where the header has 2"):
        load_glue_splits(task(tmp_path))
    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t0", "b\tpositive"])  # the file's line named
    with pytest.raises(DataError, match=r"train.tsv\), line 3: label 'positive' is not a class id 0..1 or one of GLUE's "
                                        r"label names \['entailment', 'not_entailment'\]: write the labels as class ids"):
        load_glue_splits(task(tmp_path))
    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t2"])
    with pytest.raises(DataError, match="line 2: label 2 is outside 0..1: number the classes from 0, or set "
                                        "task.num_labels to their count"):
        load_glue_splits(task(tmp_path))
    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\thigh"])
    with pytest.raises(DataError, match="score 'high' is not a number"):
        load_glue_splits(task(tmp_path, num_labels=1))
    for score in ("nan", "inf", "-Infinity"):  # taken as labels before: a nan Pearson, or a nan loss mid-run
        write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t1.5", f"b\t{score}"])
        with pytest.raises(DataError, match=f"score '{score}' is not a finite number: fix or remove that row"):
            load_glue_splits(task(tmp_path, num_labels=1))


def test_a_regression_score_of_minus_one_is_a_score(tmp_path: Path) -> None:
    """-1 marks GLUE's unlabeled test rows, but it is also a score (sentiment in [-1, 1]): a regression split keeps
    its -1 scores, and only a split whose every label is -1 (or empty) is unlabeled. Every -1 was dropped silently."""
    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t-1", "b\t0.5", "c\t-1.0", "d\t"])
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "e\t-1", "f\t-1"])
    with pytest.raises(DataError, match="dev.tsv.* has no labels"):  # every label -1: a test split
        load_glue_splits(task(tmp_path, num_labels=1))
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "e\t-1", "f\t1"])
    splits = load_glue_splits(task(tmp_path, num_labels=1))
    assert splits["train"]["label"] == [-1.0, 0.5, -1.0]  # the empty label alone is unlabeled
    assert splits["validation"]["label"] == [-1.0, 1.0]
    write(tmp_path / "train.tsv", ["sentence\tlabel", "a\t-1", "b\t1"])
    assert load_glue_splits(task(tmp_path))["train"]["label"] == [1]  # a class id is never -1: unlabeled


def test_same_train_and_eval_split(sst2: Path) -> None:
    with pytest.raises(DataError, match="both 'train'"):
        load_glue_splits(task(sst2, eval_split="train"))


# --- Hub ------------------------------------------------------------------------------------------------------------


def hub_task(**overrides) -> TaskConfig:
    return TaskConfig(name="cola", hub_id="nyu-mll/glue", hub_config="cola", **overrides)


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_glue_splits(hub_task())
    message = str(caught.value)
    assert "\n" not in message
    assert "could not reach the Hugging Face Hub for 'nyu-mll/glue/cola'" in message
    assert "task.data_dir=<folder with train.tsv/dev.tsv>" in message


def test_hub_splits_are_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["unacceptable", "acceptable"]),
                                  "idx": datasets.Value("int32")})
    glue = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [1, 0, 1], "idx": [0, 1, 2]},
                                            features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["d"], "label": [0], "idx": [0]}, features=features),
        "test": datasets.Dataset.from_dict({"sentence": ["e"], "label": [-1], "idx": [0]}, features=features),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, config: glue)  # loaded once, all splits
    splits = load_glue_splits(hub_task(max_train_samples=2))
    assert splits["train"].column_names == ["sentence", "label"]
    assert len(splits["train"]) == 2 and splits["validation"].to_list() == [{"sentence": "d", "label": 0}]
    with pytest.raises(DataError, match="split 'test' \\(Hub 'nyu-mll/glue/cola'\\) has no labels"):
        load_glue_splits(hub_task(eval_split="test"))
    with pytest.raises(DataError, match="has no split 'dev'; its splits are \\['test', 'train', 'validation'\\]"):
        load_glue_splits(hub_task(eval_split="dev"))


def test_neither_hub_nor_dir() -> None:
    with pytest.raises(DataError, match="sets neither task.hub_id nor task.data_dir"):
        load_glue_splits(TaskConfig(name="x"))


# --- the real GLUE files (development machines only) ----------------------------------------------------------------


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared GLUE data at {SHARED_DATA}")
@pytest.mark.parametrize(
    ("name", "fields", "label_field", "num_labels", "sizes"),
    [
        ("cola", ["sentence"], "label", 2, (8551, 1043)),
        ("sst2", ["sentence"], "label", 2, (60614, 6735)),
        ("stsb", ["sentence1", "sentence2"], "score", 1, (5749, 1500)),
        ("rte", ["sentence1", "sentence2"], "label", 2, (2490, 277)),
    ],
)
def test_shared_glue_files(name: str, fields: list[str], label_field: str, num_labels: int,
                           sizes: tuple[int, int]) -> None:
    config = task(SHARED_DATA / name, text_fields=fields, label_field=label_field, num_labels=num_labels)
    splits = load_glue_splits(config)
    assert (len(splits["train"]), len(splits["validation"])) == sizes
    assert splits["train"].column_names == [*fields, "label"]
    labels = np.asarray(splits["validation"]["label"])
    if num_labels == 1:
        assert labels.min() >= 0 and labels.max() <= 5
    else:
        assert set(labels.tolist()) == {0, 1}
