"""This package's side of every benchmark, starting from fastai's initial weights through `convert_fastai_state_dict`:
LM training through `ULMFiTTrainer`, the classifier in a plain PyTorch loop, inference in batches and through
`pipeline`, generation through `generate`."""

import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, AwdLstmForSequenceClassification
from ulmfit.convert_fastai import convert_fastai_state_dict
from ulmfit.data import TokenizedCorpus
from ulmfit.optim import create_optimizer
from ulmfit.trainer import ULMFiTTrainer, ULMFiTTrainingArguments

from .data import Prepared, lm_batches, lm_stream, sorted_batches
from .measure import BatchClock, Stopwatch, autocast, nll_to_ppl
from .settings import Settings

warnings.filterwarnings("ignore")
PAD = 1
UNK = 0


def _shape(settings: Settings) -> dict:
    size = settings.model
    return dict(emb_size=size.emb_size, hidden_size=size.hidden_size, num_layers=size.num_layers)


def _load(model: nn.Module, path, expected_kind: str) -> nn.Module:
    state_dict, kind = convert_fastai_state_dict(torch.load(path))
    if kind != expected_kind:
        raise ValueError(f"{path} holds a fastai {kind}, expected a {expected_kind}.")
    model.load_state_dict(state_dict, strict=True)
    return model


def _tokenizer(vocab: list[str]):
    """The package's fastai-exact tokenizer, when this checkout has it."""
    try:
        from modeling_awd_lstm.tokenization_awd_lstm import AwdLstmTokenizer
    except ImportError:
        return None
    return AwdLstmTokenizer(vocab=vocab)


def _pad_right(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(doc) for doc in docs)
    ids = torch.full((len(docs), longest), PAD, dtype=torch.long)
    mask = torch.zeros((len(docs), longest), dtype=torch.long)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)], mask[row, : len(doc)] = doc, 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------------
# 1. Language-model training (and perplexity after it)
# ----------------------------------------------------------------------------------------------------------------------
class StepClock(TrainerCallback):
    """Wall and CPU time of every optimizer step of a `Trainer`, from the end of one step to the end of the next: the
    batch, forward, backward, optimizer and callbacks, all a step costs."""

    def __init__(self, tokens_per_step: int):
        self.clock, self.tokens_per_step = BatchClock(), tokens_per_step

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.stop(docs=0, tokens=self.tokens_per_step)
        self.clock.start()


def lm_train(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    """LM training as a user runs it: `ULMFiTTrainer` with the package's optimizer factory, on the documents that
    fastai's side reads (the Trainer's stream shuffles them), at fastai's optimizer settings and one constant rate."""
    vocab, batch_size, bptt = spec["vocab"], spec["batch_size"], settings.bptt
    n_batches = spec["warmup"] + spec["timed"]
    docs = [doc.numpy() for doc in lm_stream(data["lm"][vocab]["train_docs"], batch_size * n_batches * bptt + 1)]
    corpus = TokenizedCorpus(np.concatenate(docs), np.cumsum([0] + [len(doc) for doc in docs]))
    model = _load(
        AwdLstmForCausalLM(AwdLstmConfig(vocab_size=vocab, **_shape(settings))), prepared.lm_init[vocab], "lm"
    )
    step_clock = StepClock(tokens_per_step=batch_size * bptt)
    with tempfile.TemporaryDirectory() as output_dir:
        args = ULMFiTTrainingArguments(
            output_dir=output_dir, max_steps=n_batches, per_device_train_batch_size=batch_size, lm_bptt=bptt,
            learning_rate=settings.lr, ulmfit_schedule="constant", discriminative_lr_factor=1.0,
            adam_beta1=0.9, adam_beta2=0.99,  # fastai's Adam (its text learners' one-cycle moves beta1 below 0.9)
            bf16=spec["precision"] == "bf16", max_grad_norm=0.0,  # fastai clips nothing
            save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, seed=settings.seed,
        )
        ULMFiTTrainer(model=model, args=args, train_dataset=corpus, callbacks=[step_clock]).train()
    result = {"steps": step_clock.clock.after(spec["warmup"]), "tokens_per_batch": batch_size * bptt,
              "path": "ULMFiTTrainer + ULMFiTOptimizerFactory"}
    if spec["eval_batches"]:
        result["valid_ppl"] = _lm_perplexity(model, data["lm"][vocab]["valid_docs"], settings, spec)
    return result


def _lm_perplexity(model: AwdLstmForCausalLM, valid_docs, settings: Settings, spec: dict) -> float:
    model.eval()
    total, count, cache = 0.0, 0, None
    with torch.no_grad():
        for x, y in lm_batches(valid_docs, spec["batch_size"], settings.bptt, spec["eval_batches"]):
            out = model(x, cache=cache)
            cache = out.cache
            logits = out.logits.float()
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    return nll_to_ppl(total, count)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Classifier training
# ----------------------------------------------------------------------------------------------------------------------
def _classifier(settings: Settings, prepared: Prepared) -> AwdLstmForSequenceClassification:
    config = AwdLstmConfig(
        vocab_size=settings.clas_vocab, num_labels=2, bptt=settings.clas_bptt, max_len=settings.clas_max_len,
        **AwdLstmConfig.dropouts("classifier", 0.5), **_shape(settings),
    )
    return _load(AwdLstmForSequenceClassification(config), prepared.clas_init, "classifier")


def clas_train(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    docs, labels = data["clas_train"]["ids"], data["clas_train"]["labels"]
    model = _classifier(settings, prepared).train()
    # The package's optimizer at fastai's Adam settings, one rate for every layer group.
    optimizer = create_optimizer(model, settings.lr, discriminative_factor=1.0, betas=(0.9, 0.99))
    clock = BatchClock()
    torch.manual_seed(settings.seed)
    for batch in sorted_batches([len(d) for d in docs], settings.clas_train_batch_size, shuffle_seed=settings.seed):
        ids, mask = _pad_right([docs[i] for i in batch])
        clock.start()
        with autocast(spec["precision"]):
            loss = model(ids, attention_mask=mask, labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.stop(docs=len(batch), tokens=int(mask.sum()))
    return {"steps": clock.after(settings.clas_warmup_batches)}


# ----------------------------------------------------------------------------------------------------------------------
# 3. Classifier inference: sorted batches and one review at a time (pipeline, from raw text)
# ----------------------------------------------------------------------------------------------------------------------
def _predict_batches(model, docs: list[torch.Tensor], batch_size: int, precision: str, clock: BatchClock | None = None):
    probs = torch.empty(len(docs), 2)
    with torch.inference_mode(), autocast(precision):
        for batch in sorted_batches([len(d) for d in docs], batch_size, shuffle_seed=None):
            ids, mask = _pad_right([docs[i] for i in batch])
            if clock is not None:
                clock.start()
            logits = model(ids, attention_mask=mask).logits
            probs[batch] = logits.float().softmax(-1)
            if clock is not None:
                clock.stop(docs=len(batch), tokens=int(mask.sum()))
    return probs


def clas_infer(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    test = data["clas_test"]
    docs, texts = test["ids"], test["texts"]
    precision = spec["precision"]
    model = _classifier(settings, prepared).eval()
    _predict_batches(model, docs[:8], 8, precision)  # warm-up
    clock = BatchClock()
    watch = Stopwatch()
    probs = _predict_batches(model, docs, settings.infer_batch_size, precision, clock)
    batched_time, batched_cpu = watch.read()

    tokenizer = _tokenizer(data["vocabs"][settings.clas_vocab])
    single_docs = texts[: settings.single_docs]
    single_times, single_cpu, single_probs = [], [], []
    if tokenizer is not None:
        from transformers import pipeline

        classify = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
        label_ids = model.config.label2id
        ids_match = [tokenizer(text)["input_ids"] == docs[i].tolist() for i, text in enumerate(single_docs)]
        for text in single_docs:
            watch = Stopwatch()
            with autocast(precision):
                scores = classify(text, top_k=None)
            wall, cpu = watch.read()
            single_times.append(wall)
            single_cpu.append(cpu)
            single_probs.append(next(s["score"] for s in scores if label_ids[s["label"]] == 1))
        mode = 'pipeline("text-classification")(text)'
    else:
        ids_match = None
        for doc in docs[: settings.single_docs]:
            watch = Stopwatch()
            with torch.inference_mode(), autocast(precision):
                doc_probs = model(doc[None]).logits.float().softmax(-1)[0]
            wall, cpu = watch.read()
            single_times.append(wall)
            single_cpu.append(cpu)
            single_probs.append(float(doc_probs[1]))
        mode = "model(input_ids) on fastai's ids (no tokenizer in this checkout)"
    return {
        "batched": {"docs": len(docs), "tokens": sum(len(d) for d in docs), "time": batched_time,
                    "cpu": batched_cpu, "steps": clock.after(0)},
        "probs": [round(float(p), 6) for p in probs[:, 1]],
        "single": {"times": single_times, "cpu": single_cpu, "probs": single_probs, "mode": mode,
                   "ids_match_fastai": ids_match},
    }


# ----------------------------------------------------------------------------------------------------------------------
# 4. Generation: generate() with the LSTM state as its cache
# ----------------------------------------------------------------------------------------------------------------------
def generate(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    vocab = data["vocabs"][settings.gen_vocab]
    config = AwdLstmConfig(vocab_size=settings.gen_vocab, **_shape(settings))
    model = _load(AwdLstmForCausalLM(config), prepared.lm_init[settings.gen_vocab], "lm").eval()
    tokenizer = _tokenizer(vocab)
    prompt, prompt_ids = data["prompt"]["text"], data["prompt"]["ids"]

    def run(new_tokens: int) -> tuple[int, str]:
        # Sampling from the whole distribution without xxunk, never stopping at xxeos: what fastai's predict does.
        # (`eos_token_id=None` rather than `min_new_tokens`, which would forbid xxeos and costs a pass over the
        # vocabulary per token.)
        if tokenizer is not None:
            inputs = tokenizer(prompt, return_tensors="pt")
        else:
            inputs = {"input_ids": prompt_ids[None], "attention_mask": torch.ones_like(prompt_ids[None])}
        with autocast(spec["precision"]):
            out = model.generate(
                **inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
                eos_token_id=None, suppress_tokens=[UNK], pad_token_id=PAD,
            )
        text = tokenizer.decode(out[0], skip_special_tokens=True) if tokenizer is not None else ""
        return out.shape[1] - inputs["input_ids"].shape[1], text

    run(3)  # warm-up
    runs, text = [], ""
    for index in range(settings.gen_runs):
        torch.manual_seed(settings.seed + index)
        watch = Stopwatch()
        produced, text = run(settings.new_tokens)
        wall, cpu = watch.read()
        runs.append({"time": wall, "cpu": cpu, "new_tokens": produced})
    prompt_len = len(tokenizer(prompt)["input_ids"]) if tokenizer is not None else len(prompt_ids)
    mode = "tokenizer + generate + decode" if tokenizer is not None else "generate on fastai's prompt ids"
    return {"runs": runs, "prompt_tokens": prompt_len, "sample": text[-200:], "mode": mode}


TASKS = {"lm_train": lm_train, "clas_train": clas_train, "clas_infer": clas_infer, "generate": generate}
