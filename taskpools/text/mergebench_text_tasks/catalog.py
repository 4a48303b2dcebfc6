"""The text tasks and suites: which dataset each task reads, its fields and labels, and which models each suite holds.

Sources of the facts:
- GLUE tasks, their splits and fields: FusionBench (tanganke/fusion_bench@54c9e8c, `fusion_bench/dataset/gpt2_glue.py`,
  `config/taskpool/gpt-2_glue.yaml`, `config/taskpool/flan-t5_glue_text_generation.yaml`): scored on `validation`
  (MNLI: `validation_matched`). FusionBench loads the dataset as `glue`, which the hub now serves as `nyu-mll/glue`.
- Flan-T5 prompts and label words: FusionBench's `fusion_bench/tasks/flan_t5_text_generation/glue_prompt_templates.py`
  (kept verbatim, typos included: the experts were fine-tuned on exactly these strings).
- GPT-2 and Flan-T5 experts: FusionBench's `config/modelpool/gpt-2_glue.yaml` and `config/modelpool/Seq2SeqLMPool/
  flan-t5-base_glue{,_lora16}.yaml`.
- RoBERTa textattack experts and datasets: shared/seeds/001 (the preference-aware benchmark this project grew from);
  scored on the splits TextAttack evaluates these models on (`textattack/dataset_args.py`: ag_news and imdb `test`,
  MNLI `validation_matched`, MRPC `validation`), taken from the seed's copies of the datasets.
"""

from __future__ import annotations

from dataclasses import dataclass

GLUE = "nyu-mll/glue"


@dataclass(frozen=True)
class TextTask:
    """One task: where its examples come from and how they become model inputs."""

    name: str
    dataset: str
    config: str | None
    test_split: str
    text_fields: tuple[str, ...]
    """One field (single sentence) or two (a pair, handed to the tokenizer as text and text_pair)."""
    label_names: tuple[str, ...] = ()
    """The dataset's label names in label-id order (empty for regression)."""
    train_split: str = "train"
    label_field: str = "label"
    regression: bool = False

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.label_names)

    def split_name(self, split: str) -> str:
        if split == "test":
            return self.test_split
        if split == "train":
            return self.train_split
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


GLUE_TASKS: dict[str, TextTask] = {t.name: t for t in (
    TextTask("cola", GLUE, "cola", "validation", ("sentence",), ("unacceptable", "acceptable")),
    TextTask("mnli", GLUE, "mnli", "validation_matched", ("premise", "hypothesis"),
             ("entailment", "neutral", "contradiction")),
    TextTask("mrpc", GLUE, "mrpc", "validation", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    TextTask("qnli", GLUE, "qnli", "validation", ("question", "sentence"), ("entailment", "not_entailment")),
    TextTask("qqp", GLUE, "qqp", "validation", ("question1", "question2"), ("not_duplicate", "duplicate")),
    TextTask("rte", GLUE, "rte", "validation", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    TextTask("sst2", GLUE, "sst2", "validation", ("sentence",), ("negative", "positive")),
    TextTask("stsb", GLUE, "stsb", "validation", ("sentence1", "sentence2"), regression=True),
)}

TEXTATTACK_TASKS: dict[str, TextTask] = {t.name: t for t in (
    TextTask("ag_news", "wangrongsheng/ag_news", None, "test", ("text",), ("World", "Sports", "Business", "Sci/Tech")),
    TextTask("imdb", "stanfordnlp/imdb", None, "test", ("text",), ("neg", "pos")),
    TextTask("mnli", "SetFit/mnli", None, "validation", ("text1", "text2"), ("entailment", "neutral", "contradiction")),
    TextTask("mrpc", "SetFit/mrpc", None, "validation", ("text1", "text2"), ("not_equivalent", "equivalent")),
)}


@dataclass(frozen=True)
class Prompt:
    """A Flan-T5 prompt: `template` formatted with the example's fields; the answer is `targets[label]` (or the
    score formatted with `number_format` for regression)."""

    template: str
    targets: tuple[str, ...] = ()
    number_format: str | None = None

    def answer(self, label: float) -> str:
        if self.number_format is not None:
            return self.number_format.format(label)
        return self.targets[int(label)]


FLAN_T5_PROMPTS: dict[str, Prompt] = {
    "cola": Prompt("Indicate if the following sentence is grammatically correct or not: \"{sentence}\". "
                   "Answere 'acceptable' or 'unacceptable'.", ("unacceptable", "acceptable")),
    "mnli": Prompt("Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
                   "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
                   ("entailment", "neutral", "contradiction")),
    "mrpc": Prompt("Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? "
                   "Answere with 'yes' or 'no'.", ("no", "yes")),
    "qnli": Prompt("Given the context: '{sentence}', does the question '{question}' have an answer based on the "
                   "information provided? Answer with 'yes' or 'no'.", ("yes", "no")),
    "qqp": Prompt("Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or "
                  "'no'.", ("no", "yes")),
    "rte": Prompt("Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
                  ("yes", "no")),
    "sst2": Prompt("Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
                   ("negative", "positive")),
    "stsb": Prompt("Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) "
                   "to 5 (completely similar), rate the similarity.", number_format="{:.1f}"),
}


@dataclass(frozen=True)
class Suite:
    """A model pool and the task pool that scores it: the base model, one expert per task, and the tasks."""

    name: str
    kind: str
    """"classification" (a body merged, a head per task) or "seq2seq" (whole encoder-decoder, label words)."""
    base_model: str
    experts: dict[str, str]
    """task -> hub id of its expert (a full checkpoint, or a peft adapter when `lora`)."""
    tasks: dict[str, TextTask]
    architecture: str
    lora: bool = False
    head_mode: str = "expert"
    """Classification only. "expert": the body is merged and each task is scored with its own expert's head
    (FusionBench). "padded": heads are part of the merged model, zero-padded to the largest label count (the seed)."""
    max_length: int = 512
    """Truncation length of the tokenized inputs."""
    batch_size: int = 64
    """The largest batch the task pool hands out, whatever a caller asks for (bounds activation memory)."""

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def repo_ids(self) -> list[str]:
        return [self.base_model, *self.experts.values()]


GLUE7 = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")
GLUE8 = (*GLUE7, "stsb")
TEXTATTACK4 = {"ag_news": "textattack/roberta-base-ag-news", "imdb": "textattack/roberta-base-imdb",
               "mnli": "textattack/roberta-base-MNLI", "mrpc": "textattack/roberta-base-MRPC"}

SUITES: dict[str, Suite] = {s.name: s for s in (
    # FusionBench: tokenizer.model_max_length = 512, padding to max_length, eval batch size 8
    Suite("gpt2_glue", "classification", "gpt2", {t: f"tanganke/gpt2_{t}" for t in GLUE7},
          {t: GLUE_TASKS[t] for t in GLUE7}, "gpt2", max_length=512, batch_size=32),
    Suite("roberta-base_textattack4", "classification", "FacebookAI/roberta-base", dict(TEXTATTACK4),
          dict(TEXTATTACK_TASKS), "roberta", max_length=512, batch_size=32),
    Suite("roberta-base_textattack4_padded-heads", "classification", "FacebookAI/roberta-base", dict(TEXTATTACK4),
          dict(TEXTATTACK_TASKS), "roberta", head_mode="padded", max_length=512, batch_size=32),
    # FusionBench: the T5 tokenizer's model_max_length (512), padding to max_length, eval batch size 32
    Suite("flan-t5-base_glue", "seq2seq", "google/flan-t5-base",
          {t: f"tanganke/flan-t5-base_glue-{t}" for t in GLUE8}, {t: GLUE_TASKS[t] for t in GLUE8}, "t5",
          max_length=512, batch_size=32),
    Suite("flan-t5-base_glue-lora16", "seq2seq", "google/flan-t5-base",
          {t: f"tanganke/flan-t5-base_glue-{t}_lora-16" for t in GLUE8}, {t: GLUE_TASKS[t] for t in GLUE8}, "t5",
          lora=True, max_length=512, batch_size=32),
)}


def suite(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown text suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]
