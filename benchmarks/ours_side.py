"""This package's side of every benchmark: the transformers models with plain PyTorch loops, `generate` and
`pipeline`, starting from fastai's initial weights through `convert_fastai_state_dict`."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from modeling_awd_lstm import AwdLstmConfig, AwdLstmForCausalLM, AwdLstmForSequenceClassification
from ulmfit.convert_fastai import convert_fastai_state_dict

from .data import Prepared, lm_batches, sorted_batches
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


def fastai_like_adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """fastai's default optimizer as torch's fused AdamW (the transformers Trainer's default): betas (0.9, 0.99),
    eps 1e-5, decoupled weight decay 0.01, none on normalization parameters nor on `.bias` attributes (fastai's
    `norm_bias_params`)."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters())
        elif isinstance(getattr(module, "bias", None), nn.Parameter):
            no_decay.add(id(module.bias))
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": 0.01},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-5, fused=True)


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
def lm_train(spec: dict, settings: Settings, data: dict, prepared: Prepared) -> dict:
    vocab, batch_size, bptt = spec["vocab"], spec["batch_size"], settings.bptt
    n_batches = spec["warmup"] + spec["timed"]
    batches = lm_batches(data["lm"][vocab]["train_docs"], batch_size, bptt, n_batches)
    model = _load(
        AwdLstmForCausalLM(AwdLstmConfig(vocab_size=vocab, **_shape(settings))), prepared.lm_init[vocab], "lm"
    )
    model.train()
    optimizer = fastai_like_adamw(model, settings.lr)
    clock, cache = BatchClock(), None
    torch.manual_seed(settings.seed)
    for x, y in batches:
        clock.start()
        with autocast(spec["precision"]):
            out = model(x, cache=cache, shift_labels=y)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cache = out.cache.detach()
        del out  # the logits are not kept into the next step
        clock.stop(docs=0, tokens=x.numel())
    result = {"steps": clock.after(spec["warmup"]), "tokens_per_batch": batch_size * bptt}
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
    optimizer = fastai_like_adamw(model, settings.lr)
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
