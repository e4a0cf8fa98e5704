"""The AWD-LSTM models: fastai parity, generation with the state cache, padding, and the transformers contract."""

import json
import os
import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
    pipeline,
)

from conftest import python_without_package
from modeling_awd_lstm import (
    AwdLstmConfig,
    AwdLstmForCausalLM,
    AwdLstmForSequenceClassification,
    AwdLstmModel,
)
from modeling_awd_lstm.kernels_awd_lstm import TRANSPOSED_WEIGHTS_KEY
from ulmfit.convert_fastai import convert_fastai_state_dict

TINY = dict(emb_size=16, hidden_size=24, num_layers=3)


def tiny_config(vocab_size: int = 80, **kwargs) -> AwdLstmConfig:
    return AwdLstmConfig(vocab_size=vocab_size, **{**TINY, **kwargs})


# ----------------------------------------------------------------------------------------------------------------------
# Parity with real fastai 2.8.12 on real text
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fastai_text():
    """Real IMDb reviews tokenized and numericalized by fastai itself."""
    warnings.filterwarnings("ignore")
    from fastai.text.all import Numericalize, Tokenizer, WordTokenizer

    from conftest import read_imdb

    texts = [row["text"] for row in read_imdb("test", limit=24)]
    tokenizer = Tokenizer(WordTokenizer())
    tokens = [tokenizer(text) for text in texts]
    numericalize = Numericalize(min_freq=2)
    numericalize.setup(tokens)
    ids = [numericalize(t) for t in tokens]
    return ids, len(numericalize.vocab)


def fastai_lm_pair(vocab_size: int):
    from fastai.text.all import AWD_LSTM, awd_lstm_lm_config, get_language_model

    fastai_model = get_language_model(
        AWD_LSTM, vocab_size, config=dict(awd_lstm_lm_config, emb_sz=16, n_hid=24, n_layers=3)
    )
    state_dict, kind = convert_fastai_state_dict(fastai_model.state_dict())
    assert kind == "lm"
    ours = AwdLstmForCausalLM(tiny_config(vocab_size))
    ours.load_state_dict(state_dict, strict=True)
    return fastai_model, ours


def fastai_classifier_pair(vocab_size: int, bptt: int = 16, max_len: int = 48):
    from fastai.text.all import AWD_LSTM, get_text_classifier

    fastai_model = get_text_classifier(
        AWD_LSTM, vocab_size, 3, seq_len=bptt, config=dict(emb_sz=16, n_hid=24, n_layers=3), max_len=max_len
    )
    state_dict, kind = convert_fastai_state_dict(fastai_model.state_dict())
    assert kind == "classifier"
    config = tiny_config(vocab_size, num_labels=3, bptt=bptt, max_len=max_len, **AwdLstmConfig.dropouts("classifier"))
    ours = AwdLstmForSequenceClassification(config)
    ours.load_state_dict(state_dict, strict=True)
    return fastai_model, ours


def test_language_model_matches_fastai_in_eval_mode(fastai_text):
    ids, vocab_size = fastai_text
    fastai_model, ours = fastai_lm_pair(vocab_size)
    fastai_model.eval(), ours.eval()
    batch = torch.stack([doc[:60] for doc in ids[:4]])
    fastai_model.reset()
    expected = fastai_model(batch)[0]
    out = ours(batch)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    # fastai keeps the state between calls: continuing the stream with our cache gives the same logits.
    follow = torch.stack([doc[60:90] for doc in ids[:4]])
    torch.testing.assert_close(ours(follow, cache=out.cache).logits, fastai_model(follow)[0], atol=1e-5, rtol=0)


def test_language_model_matches_fastai_in_train_mode_with_the_same_masks(fastai_text):
    ids, vocab_size = fastai_text
    fastai_model, ours = fastai_lm_pair(vocab_size)
    fastai_model.train(), ours.train()
    batch = torch.stack([doc[:50] for doc in ids[:4]])
    fastai_model.reset()
    torch.manual_seed(7)
    expected, raw, dropped = fastai_model(batch)
    torch.manual_seed(7)
    out = ours(batch, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden_states[-1], raw, atol=1e-6, rtol=0)


def test_training_loss_is_cross_entropy_plus_fastai_ar_tar(fastai_text):
    ids, vocab_size = fastai_text
    fastai_model, ours = fastai_lm_pair(vocab_size)
    fastai_model.train(), ours.train()
    stream = torch.stack([doc[:41] for doc in ids[:4]])
    inputs, targets = stream[:, :-1], stream[:, 1:]
    fastai_model.reset()
    torch.manual_seed(3)
    logits, raw, dropped = fastai_model(inputs)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
    expected = expected + 2.0 * dropped.float().pow(2).mean() + 1.0 * (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean()
    torch.manual_seed(3)
    loss = ours(inputs, shift_labels=targets).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    ours.eval()
    eval_loss = ours(inputs, shift_labels=targets).loss
    eval_logits = ours(inputs).logits
    torch.testing.assert_close(
        eval_loss, torch.nn.functional.cross_entropy(eval_logits.reshape(-1, vocab_size), targets.reshape(-1))
    )


@pytest.mark.parametrize("length", [10, 16, 47, 48, 49, 100, 130])
def test_classifier_matches_fastai_on_unpadded_documents(fastai_text, length):
    """Including documents longer than max_len (48), where BPT3C keeps only the last chunks."""
    ids, vocab_size = fastai_text
    fastai_model, ours = fastai_classifier_pair(vocab_size)
    fastai_model.eval(), ours.eval()
    long_docs = [doc for doc in ids if len(doc) >= length][:3]
    batch = torch.stack([doc[:length] for doc in long_docs])
    expected = fastai_model(batch)[0]
    torch.testing.assert_close(ours(batch).logits, expected, atol=1e-5, rtol=0)


def test_classifier_matches_fastai_in_train_mode_with_the_same_masks(fastai_text):
    ids, vocab_size = fastai_text
    fastai_model, ours = fastai_classifier_pair(vocab_size)
    fastai_model.train(), ours.train()
    batch = torch.stack([doc[:100] for doc in ids if len(doc) >= 100][:4])
    torch.manual_seed(11)
    expected = fastai_model(batch)[0]
    torch.manual_seed(11)
    torch.testing.assert_close(ours(batch).logits, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# The bf16 CPU training kernels compute what the reference layers compute
# ----------------------------------------------------------------------------------------------------------------------
def lstm_outputs_and_grads(layer, inputs, state, lengths, run):
    """Outputs, final state and every gradient of a weighted sum of them, after `run(inputs, state)`."""
    inputs = inputs.clone().requires_grad_()
    state = tuple(s.clone().requires_grad_() for s in state)
    layer.zero_grad()
    out, (h, c) = run(inputs, state)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    ((out.float() * weights).sum() + 0.3 * h.float().sum() + 0.7 * c.float().sum()).backward()
    return [out.float(), h.float(), c.float(), inputs.grad, *(s.grad for s in state)] + [
        p.grad.clone() for p in layer.parameters()
    ]


@pytest.mark.parametrize("lengths", [None, [9, 3, 0, 7, 9]])
def test_stepwise_lstm_equals_torch_lstm_with_and_without_padding(lengths):
    """Outputs, state and all gradients in fp32 (1e-5), including padded steps and a row with no token at all."""
    from modeling_awd_lstm.kernels_awd_lstm import StepwiseLstm
    from modeling_awd_lstm.modeling_awd_lstm import AwdLstmLayer

    torch.manual_seed(0)
    layer = AwdLstmLayer(12, 20, weight_p=0.0)
    inputs, state = torch.randn(5, 9, 12), (torch.randn(1, 5, 20), torch.randn(1, 5, 20))
    lengths = torch.tensor(lengths) if lengths is not None else None
    reference = lstm_outputs_and_grads(layer, inputs, state, lengths, lambda x, s: layer(x, s, lengths))

    def stepwise(x, s):
        mask = None if lengths is None else (torch.arange(9)[:, None] < lengths[None]).float()[..., None]
        lstm = layer.lstm
        out, h, c = StepwiseLstm.apply(
            x, mask, *s, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0, torch.float32
        )
        return out, (h, c)

    for expected, got in zip(reference, lstm_outputs_and_grads(layer, inputs, state, lengths, stepwise)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad, bf16, lengths, steps, state, hidden_size, kernel", [
    (True, True, None, 7, False, 32, "lstm"),  # whole rows, a small layer: oneDNN's fused bf16 LSTM
    (True, True, None, 7, False, 4096, "stepwise_bf16"),  # a large layer
    (True, True, [7, 3], 7, False, 32, "stepwise_bf16"),  # padding: the fused kernel would need packing
    (True, False, [7, 3], 7, False, 32, "lstm"),  # fp32 training: nn.LSTM, packed
    (False, True, None, 7, False, 4096, "lstm"),  # bf16 inference
    (False, False, None, 1, True, 32, "one_token"),  # generation
    (False, False, None, 1, False, 32, "lstm"),  # a first token without a state
    (False, False, [1, 1], 1, True, 32, "lstm"),
])
def test_select_kernel_names_the_lstm_path_of_each_call(grad, bf16, lengths, steps, state, hidden_size, kernel):
    from modeling_awd_lstm.kernels_awd_lstm import select_kernel

    hidden = torch.zeros(2, steps, 8)
    state = (torch.zeros(1, 2, hidden_size), torch.zeros(1, 2, hidden_size)) if state else None
    lengths = torch.tensor(lengths) if lengths is not None else None
    with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        assert select_kernel(hidden, state, lengths, hidden_size) == kernel


@pytest.mark.parametrize("dropped", [False, True])
def test_one_token_kernel_equals_torch_lstm(dropped):
    """Generation's step (transposed weights, or `lstm_cell` on a dropped recurrent weight) against `nn.LSTM`."""
    from modeling_awd_lstm.kernels_awd_lstm import one_token_lstm

    torch.manual_seed(0)
    lstm = nn.LSTM(12, 20, batch_first=True)
    inputs, state = torch.randn(2, 1, 12), (torch.randn(1, 2, 20), torch.randn(1, 2, 20))
    weight_hh = F.dropout(lstm.weight_hh_l0, 0.5) if dropped else lstm.weight_hh_l0
    with torch.no_grad():
        expected = torch.func.functional_call(lstm, {"weight_hh_l0": weight_hh}, (inputs, state))
        got = one_token_lstm(lstm, inputs, state, weight_hh)
    for want, have in zip((expected[0], *expected[1]), (got[0], *got[1])):
        torch.testing.assert_close(have, want, atol=1e-6, rtol=1e-5)


def grad_fn_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_bf16_training_on_cpu_runs_the_stepwise_lstm_and_stays_close_to_fp32(bf16_kernels):
    bf16_kernels(True)
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config()).train()
    ids, mask = pad_batch([torch.randint(4, 80, (n,)) for n in (5, 13, 27)], pad_id=1, side="right")
    results = []
    for bf16 in (False, True):
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        assert ("StepwiseLstmBackward" in grad_fn_names(out.loss)) == bf16
        out.loss.backward()
        results.append([out.loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for expected, got in zip(*results):
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_bf16_training_picks_the_lstm_kernel_by_layer_size():
    """On whole rows, layers up to `FUSED_BF16_TRAINING_MAX_HIDDEN` train in bf16 through oneDNN's fused LSTM (faster
    there) and larger ones through the stepwise kernel, both close to fp32; a CPU without bf16 kernels trains both in
    fp32."""
    from modeling_awd_lstm.kernels_awd_lstm import FUSED_BF16_TRAINING_MAX_HIDDEN, cpu_has_bf16_kernels

    ids = torch.randint(4, 80, (3, 12), generator=torch.Generator().manual_seed(0))
    for hidden_size, fused in ((24, True), (FUSED_BF16_TRAINING_MAX_HIDDEN + 8, False)):
        torch.manual_seed(0)
        model = AwdLstmForCausalLM(tiny_config(hidden_size=hidden_size)).train()
        first_layer_dtypes = []
        model.model.layers[0].register_forward_hook(
            lambda module, inputs, output, dtypes=first_layer_dtypes: dtypes.append(output[0].dtype)
        )
        results = []
        for bf16 in (False, True):
            model.zero_grad()
            torch.manual_seed(1)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = model(ids, labels=ids)
            stepwise = "StepwiseLstmBackward" in grad_fn_names(out.loss)
            out.loss.backward()
            results.append([out.loss.detach()] + [p.grad.clone() for p in model.parameters()])
        if cpu_has_bf16_kernels():
            assert (stepwise, first_layer_dtypes[-1]) == (not fused, torch.bfloat16)
        else:
            assert (stepwise, first_layer_dtypes[-1]) == (False, torch.float32)
        for expected, got in zip(*results):
            assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_without_cpu_bf16_kernels_the_lstms_run_in_fp32_under_bf16_autocast(bf16_kernels):
    """oneDNN has no bf16 LSTM on such a CPU (it fails to create one): generation and classification still work."""
    bf16_kernels(False)
    torch.manual_seed(0)
    lm = AwdLstmForCausalLM(tiny_config()).train()
    ids = torch.randint(4, 80, (2, 9))
    lstm_dtypes = []
    lm.model.layers[0].register_forward_hook(lambda module, inputs, output: lstm_dtypes.append(output[0].dtype))
    with torch.autocast("cpu", torch.bfloat16):
        loss = lm(ids, labels=ids).loss
        assert "StepwiseLstmBackward" not in grad_fn_names(loss)
        loss.backward()
        lm.eval()
        generated = lm.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        classifier = AwdLstmForSequenceClassification(tiny_config(num_labels=3)).eval()
        logits = classifier(ids).logits
    assert set(lstm_dtypes) == {torch.float32}
    assert generated.shape == (1, 9) and logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_training_loss_equals_cross_entropy_of_the_logits(bias):
    """Training computes the loss slice by slice without logits; it equals the cross entropy of the full logits."""
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config(vocab_size=300, output_bias=bias, ar_alpha=0.0, tar_beta=0.0))
    model.loss_chunk_size = 64
    ids, targets = torch.randint(0, 300, (3, 50)), torch.randint(0, 300, (3, 50))
    targets[0, :7] = -100
    grads = []
    for chunked in (True, False):
        model.train().zero_grad()
        torch.manual_seed(1)
        out = model(ids, shift_labels=targets, output_hidden_states=True, num_items_in_batch=100)
        if chunked:
            assert out.logits is None
            loss = out.loss
        else:  # the same dropout masks (same seed), then the logits and transformers' loss rule
            torch.manual_seed(1)
            logits = model(ids, output_hidden_states=True).logits
            loss = (
                torch.nn.functional.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1), reduction="sum") / 100
            )
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Padding never changes a result
# ----------------------------------------------------------------------------------------------------------------------
def pad_batch(
    docs: list[torch.Tensor], pad_id: int, side: str, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    longest = width or max(len(d) for d in docs)
    ids = torch.full((len(docs), longest), pad_id)
    mask = torch.zeros((len(docs), longest), dtype=torch.long)
    for row, doc in enumerate(docs):
        span = slice(longest - len(doc), longest) if side == "left" else slice(0, len(doc))
        ids[row, span], mask[row, span] = doc, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_classifier_logits_do_not_depend_on_padding_or_batch_mates(side):
    torch.manual_seed(0)
    model = AwdLstmForSequenceClassification(tiny_config(num_labels=2, bptt=8, max_len=20)).eval()
    docs = [torch.randint(4, 80, (n,)) for n in (5, 13, 27, 41)]
    alone = torch.cat([model(doc[None]).logits for doc in docs])
    ids, mask = pad_batch(docs, pad_id=1, side=side)
    together = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # Padded past the longest document, as `padding="max_length"` does.
    ids, mask = pad_batch(docs, pad_id=1, side=side, width=64)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, alone, atol=1e-5, rtol=0)


def test_classifier_chunks_run_only_the_documents_still_running():
    # fastai's `real_bs`: a document that has ended costs nothing in the chunks after its end.
    torch.manual_seed(0)
    model = AwdLstmForSequenceClassification(tiny_config(num_labels=2, bptt=8, max_len=20)).eval()
    docs = [torch.randint(4, 80, (n,)) for n in (5, 13, 27, 41)]
    rows_per_chunk = []
    model.model.register_forward_hook(
        lambda module, args, kwargs, out: rows_per_chunk.append(kwargs["input_ids"].size(0)), with_kwargs=True
    )
    with torch.inference_mode():
        model(*pad_batch(docs, pad_id=1, side="right"))
    assert rows_per_chunk == [4, 3, 2, 2, 1, 1]  # chunks starting at 0, 8, ..., 40

    # Skipping ended documents changes no gradient.
    ids, mask = pad_batch(docs, pad_id=1, side="right")
    model(ids, attention_mask=mask).logits.sum().backward()
    batched = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for doc in docs:
        model(doc[None]).logits.sum().backward()
    for got, alone in zip(batched, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


def test_a_backward_classifier_reads_each_document_from_its_end():
    torch.manual_seed(0)
    forward = AwdLstmForSequenceClassification(tiny_config(num_labels=2, bptt=8, max_len=20)).eval()
    backward = AwdLstmForSequenceClassification(tiny_config(num_labels=2, bptt=8, max_len=20, backwards=True)).eval()
    backward.load_state_dict(forward.state_dict())
    docs = [torch.randint(4, 80, (n,)) for n in (5, 13, 27, 41)]
    expected = torch.cat([forward(doc.flip(0)[None]).logits for doc in docs])
    for side in ("left", "right"):
        ids, mask = pad_batch(docs, pad_id=1, side=side)
        torch.testing.assert_close(backward(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_lm_outputs_and_state_do_not_depend_on_padding(side):
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config()).eval()
    docs = [torch.randint(4, 80, (n,)) for n in (3, 9, 6)]
    ids, mask = pad_batch(docs, pad_id=1, side=side)
    out = model(ids, attention_mask=mask)
    nxt = torch.randint(4, 80, (3, 1))
    continued = model(nxt, cache=out.cache).logits[:, -1]
    for row, doc in enumerate(docs):
        single = model(doc[None])
        real = mask[row].bool()
        torch.testing.assert_close(out.logits[row, real], single.logits[0], atol=1e-5, rtol=0)
        expected_next = model(nxt[row : row + 1], cache=single.cache).logits[:, -1]
        torch.testing.assert_close(continued[row : row + 1], expected_next, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------
def test_generation_with_the_state_cache_equals_recomputing_the_prefix():
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config()).eval()
    prompt = torch.randint(4, 80, (2, 7))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=None)
    recomputed = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, eos_token_id=None)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, recomputed)
    # Each new token costs one step: the model only ever sees one token at a time after the prompt.
    seen = []
    original_forward = model.model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return original_forward(*args, **kwargs)

    model.model.forward = spy
    model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert seen == [7, 1, 1, 1, 1]


def test_one_token_steps_read_transposed_weights_that_follow_every_change():
    """On CPU a step of one or two rows reads cached transposes of the LSTM and decoder weights: it gives the modules'
    own logits, reads a weight anew once it is changed in place or replaced, and `train()` frees the copies."""
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config()).eval()
    prompt, token = torch.randint(4, 80, (2, 7)), torch.randint(4, 80, (2, 1))

    def step_logits(grad: bool) -> torch.Tensor:  # with grad enabled the step runs the modules as they are
        with torch.set_grad_enabled(grad):
            cache = model(prompt, use_cache=True).cache
            return model(token, cache=cache).logits.detach()

    def check() -> None:
        fast = step_logits(grad=False)
        assert TRANSPOSED_WEIGHTS_KEY in model.lm_head.__dict__
        assert all(TRANSPOSED_WEIGHTS_KEY in layer.lstm.__dict__ for layer in model.model.layers)
        torch.testing.assert_close(fast, step_logits(grad=True), rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # tied: the embedding changes with it
        model.model.layers[1].lstm.weight_hh_l0.add_(0.5)
    check()
    other = AwdLstmForCausalLM(tiny_config())
    model.load_state_dict(other.state_dict())
    check()
    model.model.layers[0].lstm.weight_ih_l0 = torch.nn.Parameter(
        torch.randn_like(model.model.layers[0].lstm.weight_ih_l0)
    )
    check()
    model.train()  # training makes the copies stale: their memory is freed
    assert not any(TRANSPOSED_WEIGHTS_KEY in module.__dict__ for module in model.modules())
    model.eval()
    check()


def test_sampling_and_beam_search_follow_the_cache():
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config()).eval()
    prompt = torch.randint(4, 80, (2, 5))
    settings = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=None)
    torch.manual_seed(5)
    cached = model.generate(prompt, use_cache=True, **settings)
    torch.manual_seed(5)
    recomputed = model.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached, recomputed)
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None)
    assert torch.equal(
        model.generate(prompt, use_cache=True, **beams), model.generate(prompt, use_cache=False, **beams)
    )


def test_generation_from_a_left_padded_batch_matches_each_prompt_alone():
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config()).eval()
    prompts = [torch.randint(4, 80, (n,)) for n in (4, 9)]
    ids, mask = pad_batch(prompts, pad_id=1, side="left")
    batched = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1
    )
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[row, -6:], alone[0, -6:])


# ----------------------------------------------------------------------------------------------------------------------
# The transformers contract
# ----------------------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_keeps_outputs_and_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {
        "model.safetensors", "config.json", "modeling_awd_lstm.py", "kernels_awd_lstm.py", "configuration_awd_lstm.py"
    } <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {
        "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"
    }
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, AwdLstmForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 80, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), AwdLstmModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), AwdLstmConfig)


def test_untied_decoder_stays_untied(tmp_path):
    model = AwdLstmForCausalLM(tiny_config(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AwdLstmForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_classifier_from_a_language_model_keeps_the_encoder(tmp_path):
    torch.manual_seed(0)
    lm = AwdLstmForCausalLM(tiny_config())
    lm.save_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, **AwdLstmConfig.dropouts("classifier", drop_mult=0.5)
    )
    assert isinstance(classifier, AwdLstmForSequenceClassification)
    assert classifier.classifier.layers[-1].out_features == 5
    assert classifier.config.output_p == pytest.approx(0.2) and classifier.config.head_dropouts == [0.2, 0.1]
    assert classifier.classifier.layers[1].p == pytest.approx(0.2)
    for (name, theirs), ours in zip(lm.model.state_dict().items(), classifier.model.state_dict().values()):
        assert torch.equal(theirs, ours), name


def test_from_pretrained_with_a_different_number_of_labels(tmp_path):
    model = AwdLstmForSequenceClassification(tiny_config(num_labels=2))
    model.save_pretrained(tmp_path)
    resized = AwdLstmForSequenceClassification.from_pretrained(tmp_path, num_labels=4, ignore_mismatched_sizes=True)
    assert resized.classifier.layers[-1].out_features == 4
    assert torch.equal(resized.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_gradient_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    for model in (
        AwdLstmForCausalLM(tiny_config()), AwdLstmForSequenceClassification(tiny_config(num_labels=3, bptt=8))
    ):
        model.train()
        ids = torch.randint(4, 80, (3, 20))
        labels = ids if isinstance(model, AwdLstmForCausalLM) else torch.tensor([0, 1, 2])
        model(ids, labels=labels).loss.backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == []


def test_eval_is_deterministic_and_training_is_not():
    torch.manual_seed(0)
    model = AwdLstmForCausalLM(tiny_config())
    ids = torch.randint(4, 80, (2, 12))
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_return_dict_false_gives_tuples():
    model = AwdLstmForSequenceClassification(tiny_config(num_labels=2)).eval()
    ids = torch.randint(4, 80, (2, 12))
    loss, logits = model(ids, labels=torch.tensor([0, 1]), return_dict=False)
    assert logits.shape == (2, 2) and loss.ndim == 0
    lm = AwdLstmForCausalLM(tiny_config()).eval()
    logits, cache = lm(ids, return_dict=False)
    assert logits.shape == (2, 12, 80) and cache.get_seq_length() == 12


@pytest.mark.parametrize(
    "problem_type,labels",
    [
        ("single_label_classification", torch.tensor([0, 2])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
        ("regression", torch.tensor([[0.5, 1.0, -1.0], [0.1, 0.2, 0.3]])),
    ],
)
def test_problem_types(problem_type, labels):
    torch.manual_seed(0)
    model = AwdLstmForSequenceClassification(tiny_config(num_labels=3, problem_type=problem_type)).eval()
    out = model(torch.randint(4, 80, (2, 10)), labels=labels)
    if problem_type == "single_label_classification":
        expected = torch.nn.functional.cross_entropy(out.logits, labels)
    elif problem_type == "multi_label_classification":
        expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    else:
        expected = torch.nn.functional.mse_loss(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(hidden_size=-3), "hidden_size"),
        (dict(emb_size=0), "emb_size"),
        (dict(num_layers=0), "num_layers"),
        (dict(weight_p=1.0), "weight_p"),
        (dict(input_p=-0.1), "input_p"),
        (dict(classifier_dropouts=[0.5, 1.2]), "classifier_dropouts"),
        (dict(classifier_dropouts=[0.5]), "one value per linear layer"),
        (dict(pad_token_id=80), "pad_token_id"),
        (dict(ar_alpha=-1.0), "ar_alpha"),
    ],
)
def test_bad_config_values_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_empty_document_in_a_classifier_batch_is_a_clear_error():
    model = AwdLstmForSequenceClassification(tiny_config(num_labels=2)).eval()
    ids = torch.randint(4, 80, (2, 6))
    with pytest.raises(ValueError, match=r"Rows \[1\]"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [0] * 6]))


# ----------------------------------------------------------------------------------------------------------------------
# Remote code and pipelines
# ----------------------------------------------------------------------------------------------------------------------
def test_a_process_without_the_package_loads_every_head_with_trust_remote_code(tmp_path):
    torch.manual_seed(0)
    lm = AwdLstmForCausalLM(tiny_config()).eval()
    lm.save_pretrained(tmp_path / "lm")
    classifier = AwdLstmForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2).eval()
    classifier.save_pretrained(tmp_path / "clf")
    ids = torch.randint(4, 80, (2, 30))
    torch.save({"ids": ids, "lm": lm(ids).logits, "clf": classifier(ids).logits}, tmp_path / "expected.pt")
    script = f"""
import importlib.util, sys, torch
assert importlib.util.find_spec("modeling_awd_lstm") is None, "the package must not be importable here"
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
expected = torch.load({str(tmp_path / 'expected.pt')!r})
lm = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'lm')!r}, trust_remote_code=True).eval()
clf = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'lm')!r}, trust_remote_code=True, num_labels=2)
clf = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'clf')!r}, trust_remote_code=True).eval()
assert torch.equal(lm(expected["ids"]).logits, expected["lm"])
assert torch.allclose(clf(expected["ids"]).logits, expected["clf"], atol=1e-6)
print("ok")
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(python_without_package(script), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def word_level_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A minimal real word-level tokenizer whose decoded continuations keep their spaces (Metaspace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["<unk>", "<pad>", "<s>", "</s>"] + [f"▁{w}" for w in words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    # The pipeline decodes only the new tokens and appends them to the prompt: keep their leading space.
    backend.decoder = decoders.Metaspace(prepend_scheme="never")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def test_text_generation_and_classification_pipelines(tmp_path):
    words = "the movie was good bad great awful and i liked hated it plot acting".split()
    tokenizer = word_level_tokenizer(words)
    vocab_size = len(tokenizer)
    torch.manual_seed(0)
    lm = AwdLstmForCausalLM(tiny_config(vocab_size, pad_token_id=1, bos_token_id=2, eos_token_id=3)).eval()
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    generator = pipeline("text-generation", model=str(tmp_path / "lm"))
    text = generator("the movie was", max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]["generated_text"]
    prompt_ids = tokenizer("the movie was", return_tensors="pt").input_ids
    new_ids = lm.generate(prompt_ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, prompt_ids.shape[1]:]
    words_out = [tokenizer.convert_ids_to_tokens(int(i)).lstrip("▁") for i in new_ids if int(i) > 3]
    assert text == "the movie was " + " ".join(words_out)

    config = tiny_config(vocab_size, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    classifier = AwdLstmForSequenceClassification(config).eval()
    classifier.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    classify = pipeline("text-classification", model=str(tmp_path / "clf"))
    predictions = classify(["the movie was good", "i hated the plot and the acting"])
    assert [p["label"] in {"neg", "pos"} for p in predictions] == [True, True]
    ids = tokenizer(["the movie was good"], return_tensors="pt")
    expected = classifier(**ids).logits.softmax(-1).max().item()
    assert predictions[0]["score"] == pytest.approx(expected, abs=1e-5)
