"""fastai 2.8 side of every benchmark, as a fastai user runs it: its Learners, data loaders, callbacks and predict."""

import warnings

import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.progress import ProgressCallback
from fastai.text.all import (
    AWD_LSTM,
    Adam,
    Callback,
    CancelFitException,
    CrossEntropyLossFlat,
    DataLoaders,
    LMDataLoader,
    LMLearner,
    Pad_Chunk,
    SortedDL,
    TensorCategory,
    TensorText,
    TextDataLoaders,
    TextLearner,
    awd_lstm_clas_config,
    awd_lstm_clas_split,
    awd_lstm_lm_config,
    awd_lstm_lm_split,
    get_language_model,
    get_text_classifier,
    language_model_learner,
    text_classifier_learner,
)

from .data import Prepared, lm_batches, lm_stream
from .measure import BatchClock, Stopwatch, nll_to_ppl
from .settings import Settings

warnings.filterwarnings("ignore")
PAD = 1


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------------------
class _BatchStart(Callback):
    """Starts the clock before any other callback runs on a batch; seeds the first batch's dropout draws."""

    order = -1000

    def __init__(self, clock: BatchClock, seed: int | None = None):
        self.clock, self.seed = clock, seed

    def before_batch(self):
        if self.seed is not None:
            torch.manual_seed(self.seed)  # after the data loader's own draw, so both sides draw the same masks
            self.seed = None
        self.clock.start()


class _BatchEnd(Callback):
    """Stops the clock after every other callback (optimizer step and zeroing included)."""

    order = 1000

    def __init__(self, clock: BatchClock):
        self.clock = clock

    def after_batch(self):
        x = self.learn.xb[0]
        self.clock.stop(docs=x.shape[0], tokens=int((x != PAD).sum()))


class _StopBeforeValidation(Callback):
    """One pass over the training batches, no validation epoch (both sides evaluate the same way afterwards)."""

    def after_train(self):
        raise CancelFitException()


class CpuBf16Autocast(Callback):
    """bf16 autocast on CPU around the forward pass and the loss (with AR/TAR), as fastai's `MixedPrecision` does on
    CUDA: on CPU, `to_bf16()` leaves fastai in fp32."""

    order = 10  # MixedPrecision's order: after RNNRegularizer, so AR/TAR is computed inside the autocast region

    def before_batch(self):
        self.context = torch.autocast("cpu", dtype=torch.bfloat16)
        self.context.__enter__()

    def after_loss(self):
        self._exit()

    def after_batch(self):
        self._exit()  # inference without targets skips after_loss

    def after_cancel_batch(self):
        self._exit()

    def _exit(self):
        if getattr(self, "context", None) is not None:
            self.context.__exit__(None, None, None)
            self.context = None


def _shape(settings: Settings) -> dict:
    size = settings.model
    return dict(emb_sz=size.emb_size, n_hid=size.hidden_size, n_layers=size.num_layers)


def _precision_cbs(precision: str) -> list[Callback]:
    return [CpuBf16Autocast()] if precision == "bf16" else []


# ----------------------------------------------------------------------------------------------------------------------
# 1. Language-model training (and perplexity after it)
# ----------------------------------------------------------------------------------------------------------------------
def lm_train(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    vocab, batch_size, bptt = spec["vocab"], spec["batch_size"], settings.bptt
    n_batches = spec["warmup"] + spec["timed"]
    docs = lm_stream(data["lm"][vocab]["train_docs"], batch_size * n_batches * bptt + 1)
    train_dl = LMDataLoader([TensorText(doc) for doc in docs], bs=batch_size, seq_len=bptt, shuffle=False)
    model = get_language_model(AWD_LSTM, vocab, config={**awd_lstm_lm_config, **_shape(settings)})
    model.load_state_dict(torch.load(prepared.lm_init[vocab]))
    clock = BatchClock()
    # LMLearner (TextLearner) adds ModelResetter, RNNCallback and RNNRegularizer(alpha=2, beta=1) itself.
    learn = LMLearner(
        DataLoaders(train_dl, train_dl), model, loss_func=CrossEntropyLossFlat(), splitter=awd_lstm_lm_split,
        opt_func=Adam,
        cbs=[_BatchStart(clock, seed=settings.seed), _BatchEnd(clock), _StopBeforeValidation(),
             *_precision_cbs(spec["precision"])],
    )
    learn.remove_cb(ProgressCallback)
    with learn.no_logging():
        learn.fit(1, lr=settings.lr)
    if len(clock.times) != n_batches:
        raise RuntimeError(f"fastai ran {len(clock.times)} batches, expected {n_batches}.")
    result = {"steps": clock.after(spec["warmup"]), "tokens_per_batch": batch_size * bptt}
    if spec["eval_batches"]:
        result["valid_ppl"] = _lm_perplexity(model, data["lm"][vocab]["valid_docs"], settings, spec)
    return result


def _lm_perplexity(model, valid_docs, settings: Settings, spec: dict) -> float:
    """fp32 evaluation of the trained weights on held-out text, the stream carried across batches."""
    model.eval()
    model.reset()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in lm_batches(valid_docs, spec["batch_size"], settings.bptt, spec["eval_batches"]):
            logits = model(x)[0]
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    return nll_to_ppl(total, count)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Classifier training
# ----------------------------------------------------------------------------------------------------------------------
def _clas_items(ids: list[torch.Tensor], labels: torch.Tensor) -> list[tuple]:
    return [(TensorText(doc), TensorCategory(int(label))) for doc, label in zip(ids, labels)]


def _sorted_dl(items: list[tuple], batch_size: int, shuffle: bool, bptt: int) -> SortedDL:
    """fastai's classifier batching: `SortedDL` with `Pad_Chunk` (padding first, in bptt-sized chunks)."""
    return SortedDL(
        items, bs=batch_size, shuffle=shuffle, before_batch=Pad_Chunk(pad_idx=PAD, pad_first=True, seq_len=bptt)
    )


def _classifier(settings: Settings, prepared: Prepared):
    model = get_text_classifier(
        AWD_LSTM, settings.clas_vocab, 2, seq_len=settings.clas_bptt,
        config={**awd_lstm_clas_config, **_shape(settings)}, drop_mult=0.5, max_len=settings.clas_max_len,
    )
    model.load_state_dict(torch.load(prepared.clas_init))
    return model


def clas_train(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    import numpy as np

    np.random.seed(settings.seed)  # SortedDL shuffles its batches with numpy
    items = _clas_items(data["clas_train"]["ids"], data["clas_train"]["labels"])
    train_dl = _sorted_dl(items, settings.clas_train_batch_size, shuffle=True, bptt=settings.clas_bptt)
    clock = BatchClock()
    learn = TextLearner(
        DataLoaders(train_dl, train_dl), _classifier(settings, prepared), loss_func=CrossEntropyLossFlat(),
        splitter=awd_lstm_clas_split, opt_func=Adam,
        cbs=[_BatchStart(clock, seed=settings.seed), _BatchEnd(clock), _StopBeforeValidation(),
             *_precision_cbs(spec["precision"])],
    )
    learn.remove_cb(ProgressCallback)
    with learn.no_logging():
        learn.fit(1, lr=settings.lr)
    return {"steps": clock.after(settings.clas_warmup_batches)}


# ----------------------------------------------------------------------------------------------------------------------
# 3. Classifier inference: sorted batches (get_preds) and one review at a time (predict, from raw text)
# ----------------------------------------------------------------------------------------------------------------------
def _text_learner_dls(texts: list[str], vocab: list[str], settings: Settings, labels=None):
    """Real fastai text DataLoaders (Tokenizer + Numericalize with the shared vocabulary) so that `predict` runs
    fastai's whole text pipeline; built on a few reviews, they only carry the transforms."""
    frame = pd.DataFrame({"text": texts, **({"label": labels} if labels is not None else {})})
    if labels is None:
        return TextDataLoaders.from_df(frame, text_col="text", is_lm=True, text_vocab=vocab, bs=2,
                                       seq_len=settings.bptt, valid_pct=0.25, seed=settings.seed)
    return TextDataLoaders.from_df(frame, text_col="text", label_col="label", text_vocab=vocab, bs=4,
                                   seq_len=settings.clas_bptt, valid_pct=0.25, seed=settings.seed)


def clas_infer(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    test = data["clas_test"]
    vocab = data["vocabs"][settings.clas_vocab]
    dls = _text_learner_dls(test["texts"][:16], vocab, settings, labels=[int(v) for v in test["labels"][:16]])
    learn = text_classifier_learner(
        dls, AWD_LSTM, seq_len=settings.clas_bptt, config={**awd_lstm_clas_config, **_shape(settings)},
        pretrained=False, drop_mult=0.5, max_len=settings.clas_max_len,
    )
    learn.model.load_state_dict(torch.load(prepared.clas_init))
    learn.remove_cb(ProgressCallback)
    for cb in _precision_cbs(spec["precision"]):
        learn.add_cb(cb)
    if list(learn.dls.vocab[1]) != [0, 1]:
        raise RuntimeError(f"Unexpected label order {learn.dls.vocab[1]}.")

    items = _clas_items(test["ids"], test["labels"])
    n_docs = len(items)
    learn.get_preds(dl=_sorted_dl(items[:8], 8, shuffle=False, bptt=settings.clas_bptt))  # warm-up
    clock = BatchClock()
    dl = _sorted_dl(items, settings.infer_batch_size, shuffle=False, bptt=settings.clas_bptt)
    watch = Stopwatch()
    probs, _ = learn.get_preds(dl=dl, cbs=[_BatchStart(clock), _BatchEnd(clock)])
    batched_time, batched_cpu = watch.read()

    single_times, single_cpu, single_probs = [], [], []
    for text in test["texts"][: settings.single_docs]:
        watch = Stopwatch()
        _, _, doc_probs = learn.predict(text)
        wall, cpu = watch.read()
        single_times.append(wall)
        single_cpu.append(cpu)
        single_probs.append(float(doc_probs[1]))
    return {
        "batched": {"docs": n_docs, "tokens": sum(len(d) for d in test["ids"]), "time": batched_time,
                    "cpu": batched_cpu, "steps": clock.after(0)},
        "probs": [round(float(p), 6) for p in probs[:, 1]],
        "single": {"times": single_times, "cpu": single_cpu, "probs": single_probs, "mode": "Learner.predict(text)"},
    }


# ----------------------------------------------------------------------------------------------------------------------
# 4. Generation: LMLearner.predict
# ----------------------------------------------------------------------------------------------------------------------
def generate(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    vocab = data["vocabs"][settings.gen_vocab]
    dls = _text_learner_dls(data["clas_test"]["texts"][:16], vocab, settings)
    learn = language_model_learner(dls, AWD_LSTM, config={**awd_lstm_lm_config, **_shape(settings)}, pretrained=False)
    learn.model.load_state_dict(torch.load(prepared.lm_init[settings.gen_vocab]))
    learn.remove_cb(ProgressCallback)
    for cb in _precision_cbs(spec["precision"]):
        learn.add_cb(cb)
    prompt = data["prompt"]["text"]
    prompt_len = len(learn.dls.test_dl([prompt]).items[0])
    learn.predict(prompt, n_words=3, no_bar=True)  # warm-up
    torch.manual_seed(settings.seed)
    watch = Stopwatch()
    text = learn.predict(prompt, n_words=settings.new_tokens, no_bar=True)
    elapsed, cpu = watch.read()
    return {"runs": [{"time": elapsed, "cpu": cpu, "new_tokens": settings.new_tokens}], "prompt_tokens": prompt_len,
            "sample": text[-200:], "mode": "LMLearner.predict(text, n_words)"}


TASKS = {"lm_train": lm_train, "clas_train": clas_train, "clas_infer": clas_infer, "generate": generate}
