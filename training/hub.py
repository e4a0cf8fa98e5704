"""Stage folders, their model cards, and pushing them to the Hub.

A stage folder holds what `save_pretrained` wrote (weights, config with `auto_map`, model code, tokenizer), the
stage's record (`ulmfit_stage.json`: metrics, hyper-parameters, data, parent), its training curves and a model card
rendered from `model_card.md`. Pushing uploads exactly those files; nothing is deleted locally whatever happens.

The cards chain the stages: each card's `base_model` is its parent stage's repository, so the Hub shows
classifier -> domain language model -> general language model.
"""

import fnmatch
import json
import mmap
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

STAGE_FILE = "ulmfit_stage.json"
CURVES_FILE = "training_curves.png"
CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"

# The project's own code, which `trust_remote_code=True` loads; no other Python file is ever uploaded.
MODEL_CODE_FILES = (
    "configuration_awd_lstm.py", "modeling_awd_lstm.py", "kernels_awd_lstm.py", "tokenization_awd_lstm.py"
)
# Top-level files only: weights, configs, tokenizer files, the card, the curves and the model code. Sub-folders
# (Trainer checkpoints) and stray scripts stay local.
PUSHED_FILES = (
    "*.safetensors",
    "*.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "README.md",
    CURVES_FILE,
    *MODEL_CODE_FILES,
)

STAGES = {
    "pretrain": dict(number=1, kind="lm", description="language model pretrained on general-domain text"),
    "finetune_lm": dict(number=2, kind="lm", description="language model fine-tuned on the target domain's text"),
    "classifier": dict(number=3, kind="classifier", description="text classifier fine-tuned on labelled examples"),
}
PIPELINE_TAGS = {"lm": "text-generation", "classifier": "text-classification"}
AUTO_CLASSES = {"lm": "AutoModelForCausalLM", "classifier": "AutoModelForSequenceClassification"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class StageRecord:
    """What a stage did, saved beside its weights and used for its model card."""

    stage: str
    recipe: str
    model_name: str
    parent: str | None = None  # Hub repository id of the parent stage, or its local folder when it was not pushed
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"eval_perplexity": 41.2} or {"test_accuracy": 0.9}
    eval_split: str = "validation"  # the split of the metrics without a `test_` prefix
    hyperparameters: dict[str, object] = field(default_factory=dict)
    # One entry per source: `role` ("training data", "evaluation data", "test data"), `description`, and optionally
    # `license` and `hub` (the dataset's Hub id, listed in the card's `datasets`).
    data: list[dict[str, str]] = field(default_factory=list)
    model_summary: str = ""
    # The same data and split without ULMFiT, e.g. {"from_scratch_test_accuracy": 0.81, "tfidf_test_accuracy": 0.87}.
    baselines: dict[str, float] = field(default_factory=dict)
    language: str = "en"
    license: str | None = None
    # Markdown for the card's Training section: what the record's fields cannot say (e.g. a run continued from
    # another's weights, the time it took, how to reproduce it).
    notes: str = ""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"Unknown stage {self.stage!r}: expected one of {sorted(STAGES)}.")

    def save(self, folder: str | Path) -> None:
        record = {**asdict(self), "hyperparameters": _without_tokens(self.hyperparameters)}
        Path(folder, STAGE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "StageRecord":
        path = Path(folder, STAGE_FILE)
        if not path.exists():
            raise FileNotFoundError(f"{folder} is not a ULMFiT stage folder: it has no {STAGE_FILE}.")
        return cls(**json.loads(path.read_text()))


def _without_tokens(hyperparameters: dict[str, object]) -> dict[str, object]:
    # Hyper-parameters often come from `TrainingArguments`, whose `hub_token` must never reach a file or a card.
    return {
        name: value for name, value in hyperparameters.items() if not (name == "token" or name.endswith("_token"))
    }


def hub_repo_id(name: str | None) -> str | None:
    """`name` if it is a Hub repository id (`namespace/name`) rather than a local folder, else None."""
    if name is None or Path(name).exists() or not _REPO_ID.fullmatch(name) or ".." in name or "--" in name:
        return None
    return name


def render_model_card(record: StageRecord, repo_id: str, folder: str | Path | None = None) -> ModelCard:
    """The stage's card: metadata (`base_model` = parent stage, datasets, results) and the body from model_card.md."""
    stage = STAGES[record.stage]
    pipeline_tag = PIPELINE_TAGS[stage["kind"]]
    base_model = hub_repo_id(record.parent)
    datasets = list(dict.fromkeys(repo for source in record.data if (repo := hub_repo_id(source.get("hub")))))
    results = [_result(record, metric, value) for metric, value in record.metrics.items()]
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=result["dataset_id"],
            dataset_name=result["dataset"],
            dataset_split=result["split"],
            metric_type=result["metric"],
            metric_value=result["value"],
        )
        for result in results
    ]
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        datasets=datasets or None,
        language=record.language,
        license=record.license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["ulmfit", "awd-lstm", "language-model" if stage["kind"] == "lm" else "text-classification"],
        model_name=record.model_name,
        eval_results=eval_results or None,
    )
    has_curves = folder is not None and Path(folder, CURVES_FILE).exists()
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=record.model_name,
        summary=f"ULMFiT {stage['description']}, from the `{record.recipe}` recipe.",
        stage_number=stage["number"],
        stage_description=stage["description"],
        parent=record.parent,
        parent_repo_id=base_model,
        results=results,
        baselines=record.baselines,
        curves=CURVES_FILE if has_curves else None,
        auto_class=AUTO_CLASSES[stage["kind"]],
        pipeline_tag=pipeline_tag,
        repo_id=repo_id,
        custom_tokenizer=folder is not None and Path(folder, "tokenization_awd_lstm.py").exists(),
        hyperparameters=_without_tokens(record.hyperparameters),
        model_summary=record.model_summary or "AWD-LSTM",
        notes=record.notes.strip(),
        data=[{**source, "hub": hub_repo_id(source.get("hub"))} for source in record.data],
    )


def _result(record: StageRecord, metric: str, value: float) -> dict[str, object]:
    """One metric of the card: `test_accuracy` is on the test data, other metrics on `record.eval_split`."""
    prefix, _, name = metric.partition("_") if metric.startswith(("eval_", "test_")) else ("", "", metric)
    split = "test" if prefix == "test" else record.eval_split
    # The evaluated data: the source of that role, else the training data a validation split was held out from.
    roles = ("test",) if split == "test" else ("eval", "train")
    source = next((s for role in roles for s in record.data if s.get("role", "").startswith(role)), {})
    dataset = source.get("description", "").strip("`") or record.recipe
    dataset_id = hub_repo_id(source.get("hub")) or dataset
    return dict(split=split, metric=name, value=float(value), dataset=dataset, dataset_id=dataset_id)


def write_model_card(folder: str | Path, repo_id: str, record: StageRecord | None = None) -> ModelCard:
    """Renders the card of the stage in `folder` (its `record`, by default the one saved there) for `repo_id` and
    saves it as the folder's README.md."""
    card = render_model_card(record or StageRecord.load(folder), repo_id, folder)
    card.save(Path(folder, "README.md"))
    return card


def stage_files(folder: str | Path) -> list[str]:
    """The files of `folder` that a push uploads (see `PUSHED_FILES`), sorted."""
    return sorted(
        path.name
        for path in Path(folder).iterdir()
        if path.is_file() and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in PUSHED_FILES)
    )


class HubPushError(RuntimeError):
    """A push failed; the stage's files are still on disk and the same push can simply be run again."""


def push_stage(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    revision: str | None = None,
    tag: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Pushes a stage folder to `repo_id` and returns the commit's URL (the current one when nothing changed).

    Creates the repository (private if `private`; an existing one keeps its visibility) and the `revision` branch if
    needed, renders the card for this repository, uploads only the stage's own files (`stage_files`) and tags the
    commit with `tag`: one tag per run, so a later run never takes over a tag unseen. Files already on the Hub with
    the same content are not uploaded again and a push with nothing changed makes no commit, so an interrupted push
    is finished by running it again. `token` defaults to the logged-in one (`hf auth login` or `HF_TOKEN`).

    Raises `HubPushError`, saying what went wrong and what to do, when the Hub refuses or the connection is lost;
    the folder is never modified beyond its README.md.
    """
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no saved model (config.json missing): nothing to push.")
    token = token or get_token()
    if not token:
        raise HubPushError(
            f"No Hub token to push {folder} to {repo_id}: log in with `hf auth login`, set HF_TOKEN, or pass `token=`."
        )
    if (folder / STAGE_FILE).exists():
        write_model_card(folder, repo_id)
    files = stage_files(folder)
    leaking = _files_containing(folder, files, token)
    if leaking:
        raise HubPushError(
            f"Refusing to push {folder} to {repo_id}: {', '.join(leaking)} contain(s) your Hub token. Remove it from "
            f"these files and push again."
        )

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            allow_patterns=files,
            commit_message=commit_message or f"Upload ULMFiT stage from {folder.name}",
        )
        if tag is not None:
            tagged = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags}
            if tag not in tagged:
                api.create_tag(repo_id, tag=tag, revision=commit.oid)
            elif tagged[tag] != commit.oid:
                raise HubPushError(
                    f"Pushed {folder} to {repo_id} as commit {commit.oid}, but the tag {tag!r} already names an "
                    f"earlier commit ({tagged[tag]}) and was left there: use a new tag for each run."
                )
    except (HfHubHTTPError, httpx2.TransportError) as error:
        raise HubPushError(f"Pushing {folder} to {repo_id} failed: {_explain(error, repo_id, revision)}.") from error
    return commit.commit_url


def _files_containing(folder: Path, files: list[str], secret: str) -> list[str]:
    needle = secret.encode()
    found = []
    for name in files:
        path = folder / name
        if path.stat().st_size == 0:
            continue
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(needle) != -1:
                found.append(name)
    return found


def _explain(error: HfHubHTTPError | httpx2.TransportError, repo_id: str, revision: str | None) -> str:
    """What went wrong during a push, and what to do about it."""
    run_again = "run the same push again to finish it (files already uploaded are not uploaded twice)"
    if isinstance(error, httpx2.TransportError):
        return f"the connection was interrupted ({type(error).__name__}: {_first_line(error)}): {run_again}"
    status = error.response.status_code if error.response is not None else None
    if status == 401:
        return (
            "the Hub rejected the token (401 Unauthorized): log in again with `hf auth login`, or set HF_TOKEN to a "
            "valid token with write access"
        )
    if status == 403:
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
        return (
            f"the token may not write to {namespace!r} (403 Forbidden): push to your own namespace or an "
            f"organization you belong to, or use a token with write access there"
        )
    if isinstance(error, RevisionNotFoundError):
        return f"the revision {revision!r} does not exist in {repo_id}: check its name"
    if isinstance(error, RepositoryNotFoundError):
        return f"the repository {repo_id} does not exist or this token cannot see it: check its name and the token"
    return f"the Hub answered {status} ({_first_line(error)}): {run_again}"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


__all__ = [
    "CURVES_FILE",
    "STAGES",
    "STAGE_FILE",
    "HubPushError",
    "StageRecord",
    "hub_repo_id",
    "push_stage",
    "render_model_card",
    "stage_files",
    "write_model_card",
]
