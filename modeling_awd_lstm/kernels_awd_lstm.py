"""The AWD-LSTM's CPU kernels: faster ways to compute exactly what `nn.LSTM` and a linear decoder with cross entropy
compute, used by `modeling_awd_lstm` where they win and tested against those references.

- `StepwiseLstm`: an LSTM layer trained under CPU bf16 autocast, one large input product and a small recurrent product
  per step (oneDNN's fused bf16 LSTM is slower on large layers and needs a packed sequence for padding);
- `one_token_lstm`: generation's one-token step, reading weights transposed for the one-row products;
- `ChunkedLinearCrossEntropy`: the training loss of a full-vocabulary decoder, a slice of tokens at a time.

`select_kernel` is the one place that decides which LSTM kernel a call runs.
"""

import functools
from typing import Literal

import torch
from torch import nn


# ----------------------------------------------------------------------------------------------------------------------
# One-token decoding on CPU. A product of one or two rows by a weight stored (out, in) runs at half the memory bandwidth
# of the same product by its (in, out) transpose (measured in fp32 on an x86 CPU: 9.1 against 4.6 ms per token for the
# 400/1152/3 model with a 30k vocabulary), so generation reads transposed copies, kept until a weight changes.
# ----------------------------------------------------------------------------------------------------------------------
def reads_transposed(inputs: torch.Tensor) -> bool:
    rows = inputs.numel() // inputs.size(-1)
    return (
        rows <= 2
        and inputs.device.type == "cpu"
        and inputs.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )


TRANSPOSED_WEIGHTS_KEY = "_transposed_weights"  # where `transposed_weights` caches on a module (outside its state dict)


def transposed_weights(module: nn.Module, *names: str) -> torch.Tensor:
    """The named weights of `module` side by side (dim 1), transposed and contiguous; cached on the module until one of
    them is replaced or changed in place (an optimizer step, `load_state_dict`, `.to()`)."""
    weights = [getattr(module, name) for name in names]
    key = tuple((weight.data_ptr(), weight._version) for weight in weights)
    cached = module.__dict__.get(TRANSPOSED_WEIGHTS_KEY)
    if cached is None or cached[0] != key:
        cached = (key, torch.cat([weight.detach() for weight in weights], 1).t().contiguous())
        module.__dict__[TRANSPOSED_WEIGHTS_KEY] = cached
    return cached[1]


# ----------------------------------------------------------------------------------------------------------------------
# bf16 training on CPU. On CPUs with bf16 matrix units, oneDNN's fused LSTM runs the backward pass of a large layer at a
# fraction of the units' speed, and a full-vocabulary decoder spends most of its time writing and re-reading fp32
# logits. The two autograd functions below do the same arithmetic as large bf16 matrix products: the LSTM projects every
# input in one product and runs only the small recurrent product per step (gate activations and cell states in fp32),
# and the decoder computes the cross entropy and its gradients a slice of tokens at a time, never holding all the
# logits.
# ----------------------------------------------------------------------------------------------------------------------
def cpu_bf16_autocast(tensor: torch.Tensor) -> bool:
    return (
        tensor.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


# Up to this hidden size oneDNN's fused bf16 LSTM trains faster than the stepwise kernel below; from 640 the stepwise
# one is (AVX-512 BF16, forward and backward of one layer over 70 steps: fused 1.07-1.23x faster at hidden 512, 0.85x
# at 640->640, 0.78x at 1152->1152; `python -m benchmarks.lstm_kernels`, benchmarks/results/lstm_kernels.md).
FUSED_BF16_TRAINING_MAX_HIDDEN = 512


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """Whether this CPU runs bf16 matrix products and LSTMs in hardware (oneDNN on AVX-512 or AMX). Elsewhere (an
    AVX2-only x86 CPU, say) oneDNN has no bf16 LSTM at all and bf16 products take a reference path hundreds of times
    slower than fp32, so bf16 autocast there is never worth it."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class StepwiseLstm(torch.autograd.Function):
    """One LSTM layer, batch first, PyTorch's gate order (input, forget, cell, output). `mask` (time, batch, 1) is 1
    at real tokens: at padding the state is carried unchanged and the output is zero (a packed sequence's results).
    Matrix products run in `dtype` (bf16 in training under CPU autocast), gates and cells in fp32; the activated gates
    and cells are kept for the backward pass in `dtype`, which halves the memory a long BPT3C graph holds in bf16."""

    @staticmethod
    def forward(ctx, inputs, mask, h0, c0, w_ih, w_hh, b_ih, b_hh, dtype):
        batch, steps, _ = inputs.shape
        size = w_hh.size(1)
        with torch.autocast("cpu", enabled=False):
            w_ih_c, w_hh_c = w_ih.to(dtype), w_hh.to(dtype)
            x = inputs.to(dtype).transpose(0, 1).reshape(steps * batch, -1)
            projected = torch.addmm((b_ih + b_hh).to(dtype), x, w_ih_c.t()).view(steps, batch, 4 * size)
            gates = projected.new_empty(steps, batch, 4 * size)  # activated i, f, g, o
            cells = projected.new_empty(steps + 1, batch, size)
            outputs = projected.new_empty(steps, batch, size)
            h, c = h0[0].to(dtype), c0[0].float()
            cells[0] = c
            cell_gate = slice(2 * size, 3 * size)
            for t in range(steps):
                pre = torch.addmm(projected[t], h, w_hh_c.t()).float()
                act = pre.sigmoid()
                act[:, cell_gate] = pre[:, cell_gate].tanh()
                gates[t] = act
                i, f, g, o = act.chunk(4, 1)
                c_new = torch.addcmul(f * c, i, g)
                h_new = o * c_new.tanh()
                if mask is not None:
                    keep = mask[t]
                    c = torch.lerp(c, c_new, keep)
                    outputs[t] = h_new * keep
                    h = torch.lerp(h.float(), h_new, keep).to(dtype)
                else:
                    c = c_new
                    outputs[t] = h_new
                    h = outputs[t]
                cells[t + 1] = c
        # The input weight is saved as the parameter itself and cast again in the backward pass: a saved cast would
        # hold one more copy per call, that is per chunk of a BPT3C graph.
        ctx.save_for_backward(x, mask, h0, w_ih, w_hh_c, gates, cells, outputs)
        ctx.input_dtype, ctx.dtype = inputs.dtype, dtype
        return outputs.transpose(0, 1), h[None], c[None]

    @staticmethod
    def backward(ctx, grad_outputs, grad_h, grad_c):
        x, mask, h0, w_ih, w_hh_c, gates, cells, outputs = ctx.saved_tensors
        steps, batch, size4 = gates.shape
        size = size4 // 4
        grad_outputs = grad_outputs.float().transpose(0, 1) if grad_outputs is not None else None
        dh = grad_h[0].float() if grad_h is not None else x.new_zeros(batch, size, dtype=torch.float32)
        dc = grad_c[0].float() if grad_c is not None else x.new_zeros(batch, size, dtype=torch.float32)
        grad_gates = gates.new_empty(steps, batch, size4)
        d_act = x.new_empty(batch, size4, dtype=torch.float32)
        cell_gate = slice(2 * size, 3 * size)
        for t in reversed(range(steps)):
            if mask is not None:  # a padded step passes the state's gradient through to the step before
                keep, dh_carried, dc_carried = mask[t], dh, dc
            if grad_outputs is not None:
                dh = dh + grad_outputs[t]
            if mask is not None:
                dh, dc = dh * keep, dc * keep
            act, c_before = gates[t].float(), cells[t].float()
            i, f, g, o = act.chunk(4, 1)
            tanh_c = cells[t + 1].float().tanh()  # at padding this is the carried cell, but there dh and dc are zero
            dc = dc + dh * o * (1 - tanh_c * tanh_c)
            di, df, dg, do = d_act.chunk(4, 1)
            torch.mul(dc, g, out=di), torch.mul(dc, c_before, out=df), torch.mul(dc, i, out=dg)
            torch.mul(dh, tanh_c, out=do)
            derivative = act * (1 - act)
            derivative[:, cell_gate] = 1 - g * g
            grad_gates[t] = d_act * derivative
            dh = torch.mm(grad_gates[t], w_hh_c).float()
            dc = dc * f
            if mask is not None:
                dh, dc = dh + dh_carried * (1 - keep), dc + dc_carried * (1 - keep)
        flat = grad_gates.view(steps * batch, size4)
        # Each step's recurrent input: the state before it (a padded step's gradient is zero, so its row is unused).
        previous = torch.cat([h0.to(outputs.dtype), outputs[:-1]]).view(steps * batch, size)
        grad_bias = flat.float().sum(0)
        grad_inputs = torch.mm(flat, w_ih.to(ctx.dtype)).view(steps, batch, -1).transpose(0, 1).to(ctx.input_dtype)
        return (
            grad_inputs, None, dh[None], dc[None],
            torch.mm(flat.t(), x).float(), torch.mm(flat.t(), previous).float(), grad_bias, grad_bias, None,
        )


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of `hidden @ weight.T + bias` against `targets` (-100 ignored), a slice of `chunk_size`
    tokens at a time. Each slice's gradient (softmax minus one-hot) is kept in `dtype`, and the gradients of the
    inputs come from two large products at the end, scaled in `backward`: the loss is the graph's last operation, so
    its incoming gradient is a scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, chunk_size):
        needs_grad = any(ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):
            w, h = weight.to(dtype), hidden.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = hidden.new_zeros((), dtype=torch.float32)
            grad_logits = h.new_empty(h.size(0), w.size(0)) if needs_grad else None
            # Summed slice by slice in fp32: one sum over all the bf16 gradients at the end costs 20x more.
            grad_bias = hidden.new_zeros(w.size(0), dtype=torch.float32) if needs_grad and b is not None else None
            for start in range(0, h.size(0), chunk_size):
                rows = slice(start, start + chunk_size)
                logits = (torch.addmm(b, h[rows], w.t()) if b is not None else h[rows] @ w.t()).float()
                target = targets[rows]
                valid = (target != -100).float()
                target = target.clamp_min(0)[:, None]
                top = logits.amax(-1, keepdim=True)
                picked = logits.gather(1, target)
                probs = logits.sub_(top).exp_()
                norm = probs.sum(-1, keepdim=True)
                total += ((norm.log() + top - picked)[:, 0] * valid).sum()
                if needs_grad:
                    probs.div_(norm).scatter_add_(1, target, -torch.ones_like(target, dtype=probs.dtype))
                    grad_logits[rows] = probs.mul_(valid[:, None])
                    if grad_bias is not None:
                        grad_bias += probs.sum(0)
            grads = (None, None, None)
            if needs_grad:
                grads = (grad_logits @ w, (grad_logits.t() @ h).float(), grad_bias)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return *(grad * grad_total if grad is not None else None for grad in ctx.saved_tensors), None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Which LSTM kernel a call runs
# ----------------------------------------------------------------------------------------------------------------------
LstmKernel = Literal["lstm", "stepwise_bf16", "one_token"]


def lacks_bf16_lstm(hidden: torch.Tensor) -> bool:
    """Under CPU bf16 autocast on a CPU without bf16 kernels, where oneDNN has no bf16 LSTM: the recurrence must run in
    fp32."""
    return cpu_bf16_autocast(hidden) and not cpu_has_bf16_kernels()


def select_kernel(
    hidden: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None, lengths: torch.Tensor | None,
    hidden_size: int,
) -> LstmKernel:
    """The kernel of one LSTM layer's call on `hidden` (batch, time, features):

    - "stepwise_bf16" (`StepwiseLstm`) to train under CPU bf16 autocast, unless the rows are whole and the layer is
      small enough for oneDNN's fused bf16 LSTM to be faster (`FUSED_BF16_TRAINING_MAX_HIDDEN`);
    - "one_token" (`one_token_lstm`) for one token continuing a state, as generation does;
    - "lstm" otherwise: `nn.LSTM` (cuDNN, oneDNN), as fastai runs it, packed where rows hold padding.
    """
    whole_rows = lengths is None
    if torch.is_grad_enabled() and cpu_bf16_autocast(hidden):
        if not (whole_rows and hidden_size <= FUSED_BF16_TRAINING_MAX_HIDDEN):
            return "stepwise_bf16"
    if whole_rows and hidden.size(1) == 1 and state is not None:
        return "one_token"
    return "lstm"


def stepwise_lstm(
    lstm: nn.LSTM, hidden: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None,
    lengths: torch.Tensor | None, weight_hh: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`lstm` over `hidden` with `weight_hh` (the dropped recurrent weight) through `StepwiseLstm`; rows end at
    `lengths` (their real tokens first) as a packed sequence's do."""
    batch, seq_len = hidden.shape[:2]
    if state is None:
        zeros = hidden.new_zeros(1, batch, lstm.hidden_size, dtype=torch.float32)
        state = (zeros, zeros)
    mask = None
    if lengths is not None:
        mask = (torch.arange(seq_len, device=hidden.device)[:, None] < lengths[None, :]).float()[..., None]
    output, h, c = StepwiseLstm.apply(
        hidden, mask, state[0], state[1], lstm.weight_ih_l0, weight_hh, lstm.bias_ih_l0, lstm.bias_hh_l0, dtype,
    )
    return output, (h, c)


def one_token_lstm(
    lstm: nn.LSTM, hidden: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], weight_hh: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One step of `lstm` on `hidden` (batch, 1, features) from `state`: matrix-vector products. The fused kernels
    re-layout the weights on every call, which costs many times the step itself."""
    inputs, h, c = hidden[:, 0], state[0][0], state[1][0]
    if weight_hh is lstm.weight_hh_l0 and reads_transposed(inputs):
        weight = transposed_weights(lstm, "weight_ih_l0", "weight_hh_l0")
        gates = torch.addmm(lstm.bias_ih_l0 + lstm.bias_hh_l0, torch.cat([inputs, h], 1), weight)
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, 1)
        c = forget_gate.sigmoid() * c + in_gate.sigmoid() * cell_gate.tanh()
        h = out_gate.sigmoid() * c.tanh()
    else:
        h, c = torch.lstm_cell(inputs, (h, c), lstm.weight_ih_l0, weight_hh, lstm.bias_ih_l0, lstm.bias_hh_l0)
    return h[:, None], (h[None], c[None])
