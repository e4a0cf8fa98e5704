"""AWD-LSTM (Merity et al. 2017) for ULMFiT (Howard & Ruder 2018) as a transformers model.

Computes exactly what fastai 2.8's `AWD_LSTM`, `get_language_model` and `get_text_classifier` compute (same weights,
same dropout semantics, same random draws in the same order), with the recurrent state passed in and out as a cache
instead of living in the module, and with padding that never changes a result.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput

from .configuration_awd_lstm import AwdLstmConfig
from .kernels_awd_lstm import (
    TRANSPOSED_WEIGHTS_KEY,
    ChunkedLinearCrossEntropy,
    lacks_bf16_lstm,
    one_token_lstm,
    reads_transposed,
    select_kernel,
    stepwise_lstm,
    transposed_weights,
)


# ----------------------------------------------------------------------------------------------------------------------
# Dropouts. Each draws its mask with the same call fastai uses, so seeded runs give identical masks.
# ----------------------------------------------------------------------------------------------------------------------
def _dropout_mask(like: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    return like.new_empty(*shape).bernoulli_(1 - p).div_(1 - p)


def locked_dropout(hidden: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Variational dropout: one mask per sequence and feature, shared by every time step (fastai's `RNNDropout`)."""
    if not training or p == 0.0:
        return hidden
    return hidden * _dropout_mask(hidden, (hidden.size(0), 1, *hidden.shape[2:]), p)


def embedding_dropout(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drops whole rows of the embedding matrix: a dropped word is zero everywhere in the batch."""
    if not training or p == 0.0:
        return weight
    return weight * _dropout_mask(weight, (weight.size(0), 1), p)


# ----------------------------------------------------------------------------------------------------------------------
# Recurrent state
# ----------------------------------------------------------------------------------------------------------------------
class AwdLstmCache:
    """The `(h, c)` state of every LSTM layer, each of shape `(1, batch, layer_size)`.

    Passed to and returned by every forward as `cache`, so a caller can continue a stream (LM training), carry state
    across BPT3C chunks, or generate one token per step.
    """

    is_compileable = False

    def __init__(self, states: list[tuple[torch.Tensor, torch.Tensor]], seen_tokens: int = 0):
        self.states = states
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def detach(self) -> "AwdLstmCache":
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return AwdLstmCache([(h.detach(), c.detach()) for h, c in self.states], self.seen_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the state of the beams that survived."""
        self.states = [(h.index_select(1, beam_idx.to(h.device)), c.index_select(1, beam_idx.to(c.device)))
                       for h, c in self.states]

    def __len__(self) -> int:
        return len(self.states)


# ----------------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------------
class AwdLstmLayer(nn.Module):
    """One LSTM with DropConnect on its hidden-to-hidden matrix (fastai's `WeightDropout`).

    The mask is drawn once per forward and shared by the batch and every time step. `nn.LSTM` (cuDNN, oneDNN) runs on
    the dropped weight, as in fastai, except where `select_kernel` picks a faster CPU kernel (`kernels_awd_lstm`).
    """

    def __init__(self, input_size: int, hidden_size: int, weight_p: float):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.weight_p = weight_p

    def forward(
        self,
        hidden: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if lacks_bf16_lstm(hidden):
            # No bf16 LSTM on this CPU: the recurrence runs in fp32 (the rest of the model stays under autocast).
            with torch.autocast("cpu", enabled=False):
                state = None if state is None else (state[0].float(), state[1].float())
                return self.forward(hidden.float(), state, lengths)
        weight_hh = self.lstm.weight_hh_l0
        if self.training and self.weight_p > 0:
            weight_hh = F.dropout(weight_hh, p=self.weight_p, training=True)
        kernel = select_kernel(hidden, state, lengths, self.lstm.hidden_size)
        if kernel == "stepwise_bf16":
            return stepwise_lstm(self.lstm, hidden, state, lengths, weight_hh, torch.bfloat16)
        if kernel == "one_token":
            return one_token_lstm(self.lstm, hidden, state, weight_hh)
        if lengths is None:
            return self._run_lstm(hidden, state, weight_hh)
        return self._run_packed(hidden, state, lengths, weight_hh)

    def _run_lstm(self, inputs, state, weight_hh):
        if weight_hh is self.lstm.weight_hh_l0:  # no dropped weight (evaluation): swapping parameters costs time
            return self.lstm(inputs, state)
        return functional_call(self.lstm, {"weight_hh_l0": weight_hh}, (inputs, state))

    def _run_packed(self, hidden, state, lengths, weight_hh):
        # Rows hold their real tokens first (the model moved them there); a packed sequence stops each row's state
        # at its last real token. Rows with no token at all keep their incoming state.
        batch, seq_len = hidden.shape[:2]
        size = self.lstm.hidden_size
        if state is None:
            zeros = hidden.new_zeros(1, batch, size)
            state = (zeros, zeros)
        active = (lengths > 0).nonzero().squeeze(1)
        all_active = active.numel() == batch
        rows_in = hidden if all_active else hidden.index_select(0, active)
        state_in = state if all_active else (state[0].index_select(1, active), state[1].index_select(1, active))
        packed = pack_padded_sequence(rows_in, lengths[active].cpu(), batch_first=True, enforce_sorted=False)
        output, (h, c) = self._run_lstm(packed, state_in, weight_hh)
        output = pad_packed_sequence(output, batch_first=True, total_length=seq_len)[0]
        if all_active:
            return output, (h, c)
        full = output.new_zeros(batch, seq_len, size).index_copy(0, active, output)
        return full, (state[0].index_copy(1, active, h), state[1].index_copy(1, active, c))


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class AwdLstmModelOutput(ModelOutput):
    """
    last_hidden_state (`(batch, seq_len, emb_size)`): raw output of the last LSTM (zero at padded positions).
    cache (`AwdLstmCache`): the recurrent state after the last real token of each row.
    hidden_states (`tuple`): raw output of each LSTM layer (with `output_hidden_states=True`).
    dropped_hidden_states (`tuple`): output of each layer after the dropout that follows it, i.e. the input of the
        next layer; the last layer's dropout (`output_p`) belongs to the head, so its entry is its raw output.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: AwdLstmCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    dropped_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class AwdLstmCausalLMOutput(ModelOutput):
    """
    loss: cross entropy, plus AR and TAR while training.
    logits (`(batch, seq_len, vocab_size)`): next-token scores.
    cache (`AwdLstmCache`): the recurrent state, to continue the stream or generate.
    hidden_states (`tuple`): raw output of each LSTM layer (with `output_hidden_states=True`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: AwdLstmCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------
# Every saved stage names all the Auto classes: stage 3 starts `AutoModelForSequenceClassification` from an LM folder.
AUTO_MAP = {
    "AutoConfig": "configuration_awd_lstm.AwdLstmConfig",
    "AutoModel": "modeling_awd_lstm.AwdLstmModel",
    "AutoModelForCausalLM": "modeling_awd_lstm.AwdLstmForCausalLM",
    "AutoModelForSequenceClassification": "modeling_awd_lstm.AwdLstmForSequenceClassification",
}


class AwdLstmPreTrainedModel(PreTrainedModel):
    config_class = AwdLstmConfig
    config: AwdLstmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True
    _no_split_modules = ["AwdLstmLayer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights (safetensors), the config with a full `auto_map`, and this model code beside them, so the
        folder loads with `trust_remote_code=True` where this package is not installed."""
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def train(self, mode: bool = True):
        if mode:  # the transposed weight copies of one-token decoding go stale at the first step: free their memory
            for module in self.modules():
                module.__dict__.pop(TRANSPOSED_WEIGHTS_KEY, None)
        return super().train(mode)

    def _init_weights(self, module: nn.Module) -> None:
        # fastai: uniform embedding and decoder, torch's own init for the LSTMs and the head.
        if isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -self.config.init_range, self.config.init_range)
        elif isinstance(module, nn.LSTM):
            bound = 1.0 / module.hidden_size**0.5
            for param in module.parameters():
                init.uniform_(param, -bound, bound)
        elif isinstance(module, nn.Linear):
            if module is getattr(self, "lm_head", None):
                init.uniform_(module.weight, -self.config.init_range, self.config.init_range)
                if module.bias is not None:
                    init.zeros_(module.bias)
            else:
                init.kaiming_uniform_(module.weight, a=5**0.5)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class AwdLstmModel(AwdLstmPreTrainedModel):
    """Embedding, then `num_layers` weight-dropped LSTMs with locked dropout on the input and between layers."""

    def __init__(self, config: AwdLstmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.emb_size, padding_idx=config.pad_token_id)
        sizes = [config.emb_size] + [config.hidden_size] * (config.num_layers - 1) + [config.emb_size]
        self.layers = nn.ModuleList(
            AwdLstmLayer(sizes[i], sizes[i + 1], config.weight_p) for i in range(config.num_layers)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: AwdLstmCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AwdLstmModelOutput | tuple:
        r"""
        attention_mask (`(batch, seq_len)`, *optional*): 1 for real tokens, 0 for padding, left or right. Padding
            never reaches the LSTMs: a row's outputs and final state are those of its real tokens alone.
        cache (`AwdLstmCache`, *optional*): state to continue from (zeros when absent).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")

        if inputs_embeds is None:
            weight = embedding_dropout(self.embed_tokens.weight, self.config.embed_p, self.training)
            try:
                inputs_embeds = F.embedding(input_ids, weight, self.embed_tokens.padding_idx)
            except IndexError:
                raise ValueError(
                    f"Token ids must lie in 0..{self.config.vocab_size - 1} (the model's vocabulary), but the input "
                    f"holds {int(input_ids.min())}..{int(input_ids.max())}: encode the text with this model's "
                    "tokenizer."
                ) from None
        seq_len = inputs_embeds.size(1)

        order = lengths = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # Move each row's real tokens to the front (stable), run packed, and put outputs back in place below.
            real = attention_mask.bool()
            order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
            inputs_embeds = inputs_embeds.gather(1, order[..., None].expand_as(inputs_embeds))
            lengths = real.sum(1)

        hidden = locked_dropout(inputs_embeds, self.config.input_p, self.training)
        states = cache.states if cache is not None else [None] * len(self.layers)
        raw_outputs, dropped_outputs, new_states = [], [], []
        for index, layer in enumerate(self.layers):
            raw, state = layer(hidden, states[index], lengths)
            new_states.append(state)
            last = index == len(self.layers) - 1
            hidden = raw if last else locked_dropout(raw, self.config.hidden_p, self.training)
            raw_outputs.append(raw)
            dropped_outputs.append(hidden)

        def restore(tensor: torch.Tensor) -> torch.Tensor:
            if order is None:
                return tensor
            return torch.zeros_like(tensor).scatter(1, order[..., None].expand_as(tensor), tensor)

        last_hidden_state = restore(raw_outputs[-1])
        seen = (cache.seen_tokens if cache is not None else 0) + seq_len
        new_cache = AwdLstmCache(new_states, seen) if use_cache else None
        all_hidden = all_dropped = None
        if output_hidden_states:
            all_hidden = tuple(restore(t) for t in raw_outputs[:-1]) + (last_hidden_state,)
            all_dropped = tuple(restore(t) for t in dropped_outputs[:-1]) + (last_hidden_state,)
        if not return_dict:
            return tuple(v for v in (last_hidden_state, new_cache, all_hidden, all_dropped) if v is not None)
        return AwdLstmModelOutput(
            last_hidden_state=last_hidden_state,
            cache=new_cache,
            hidden_states=all_hidden,
            dropped_hidden_states=all_dropped,
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (batch, time, features) over the positions where `mask` (batch, time) is true."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)[..., None]
    return (values * mask).sum() / (mask.sum() * values.size(-1)).clamp_min(1)


class AwdLstmForCausalLM(AwdLstmPreTrainedModel, GenerationMixin):
    """AWD-LSTM language model: locked dropout (`output_p`), then a linear decoder tied to the embedding."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Tokens per slice of the training loss: its fp32 logits (slice x vocab) stay in the CPU's cache.
    loss_chunk_size = 256

    def __init__(self, config: AwdLstmConfig):
        super().__init__(config)
        self.model = AwdLstmModel(config)
        self.lm_head = nn.Linear(config.emb_size, config.vocab_size, bias=config.output_bias)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _decode(self, hidden: torch.Tensor) -> torch.Tensor:
        if not reads_transposed(hidden):
            return self.lm_head(hidden)
        flat, weight = hidden.reshape(-1, hidden.size(-1)), transposed_weights(self.lm_head, "weight")
        logits = flat @ weight if self.lm_head.bias is None else torch.addmm(self.lm_head.bias, flat, weight)
        return logits.view(*hidden.shape[:-1], -1)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is an AwdLstmCache, never a key/value cache

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: AwdLstmCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        if use_cache is False:
            # No state kept: re-read the whole prefix every step.
            return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if cache is not None:
            # The state already holds the prefix: each new token costs one step.
            return {"input_ids": input_ids[:, -1:], "cache": cache, "use_cache": True, "logits_to_keep": 1}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True, "logits_to_keep": 1}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: AwdLstmCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> AwdLstmCausalLMOutput | tuple:
        r"""
        labels (`(batch, seq_len)`, *optional*): the input ids again; they are shifted inside, as in transformers.
        shift_labels (`(batch, seq_len)`, *optional*): the next token of each position, already shifted (an LM
            stream's targets: the last position's target is the first token of the next batch). -100 is ignored.
        logits_to_keep (`int`): compute logits for the last `logits_to_keep` positions only (0: all).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        raw = outputs.last_hidden_state
        dropped = locked_dropout(raw, self.config.output_p, self.training)
        wants_loss = labels is not None or shift_labels is not None

        logits = loss = None
        if self.training and wants_loss and not logits_to_keep:
            # Training needs the loss only: decoder and cross entropy run slice by slice, without the logits.
            loss = self._chunked_loss(dropped, labels, shift_labels, num_items_in_batch)
        else:
            kept = dropped[:, -logits_to_keep:] if logits_to_keep else dropped
            logits = self._decode(kept)
            if wants_loss:
                loss = self.loss_function(
                    logits, labels, vocab_size=self.config.vocab_size,
                    shift_labels=shift_labels.contiguous() if shift_labels is not None else None,
                    num_items_in_batch=num_items_in_batch,
                )
        if loss is not None and self.training:
            loss = loss + self.activation_regularization(raw, dropped, attention_mask)

        if not return_dict:
            output = (logits, outputs.cache, outputs.hidden_states)
            output = tuple(v for v in output if v is not None)
            return ((loss,) + output) if loss is not None else output
        return AwdLstmCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)

    def _chunked_loss(self, hidden, labels, shift_labels, num_items_in_batch) -> torch.Tensor:
        """Mean cross entropy over the targets (or over `num_items_in_batch`, as transformers' causal LM loss)."""
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lm_head.weight.dtype
        total = ChunkedLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.size(-1)), self.lm_head.weight, self.lm_head.bias, targets, dtype,
            self.loss_chunk_size,
        )
        denominator = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        return total / denominator

    def activation_regularization(
        self, raw: torch.Tensor, dropped: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """AR (`ar_alpha` x mean square of the dropped output) + TAR (`tar_beta` x mean square of the step-to-step
        change of the raw output), on the last layer, over real tokens: fastai's `RNNRegularizer`."""
        mask = attention_mask.bool() if attention_mask is not None else None
        penalty = raw.new_zeros((), dtype=torch.float32)
        if self.config.ar_alpha:
            penalty = penalty + self.config.ar_alpha * _masked_mean(dropped.float().pow(2), mask)
        if self.config.tar_beta and raw.size(1) > 1:
            steps = (raw[:, 1:] - raw[:, :-1]).float().pow(2)
            pairs = mask[:, 1:] & mask[:, :-1] if mask is not None else None
            penalty = penalty + self.config.tar_beta * _masked_mean(steps, pairs)
        return penalty


class AwdLstmClassificationHead(nn.Module):
    """fastai's `PoolingLinearClassifier` after pooling: [BatchNorm1d, Dropout, Linear(no bias)] blocks, ReLU
    between."""

    def __init__(self, config: AwdLstmConfig):
        super().__init__()
        dims = [3 * config.emb_size] + list(config.classifier_hidden_sizes) + [config.num_labels]
        blocks = []
        for index, (n_in, n_out, p) in enumerate(zip(dims[:-1], dims[1:], config.head_dropouts)):
            blocks += [nn.BatchNorm1d(n_in), nn.Dropout(p), nn.Linear(n_in, n_out, bias=False)]
            if index < len(dims) - 2:
                blocks.append(nn.ReLU())
        self.layers = nn.Sequential(*blocks)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


def masked_concat_pool(hidden: torch.Tensor, keep: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """[last real output, max over kept outputs, mean over kept outputs] for each document."""
    rows = torch.arange(hidden.size(0), device=hidden.device)
    last = hidden[rows, last_index]
    max_pool = hidden.masked_fill(~keep[..., None], float("-inf")).max(dim=1).values
    mean_pool = hidden.masked_fill(~keep[..., None], 0.0).sum(dim=1) / keep.sum(dim=1, keepdim=True).to(hidden.dtype)
    return torch.cat([last, max_pool, mean_pool], dim=1)


class AwdLstmForSequenceClassification(AwdLstmPreTrainedModel):
    """ULMFiT classifier: the encoder reads each document in `bptt`-token chunks with the state carried (BPT3C),
    the last `max_len` outputs are pooled [last, max, mean] and a BatchNorm/dropout/linear head gives the logits."""

    def __init__(self, config: AwdLstmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = AwdLstmModel(config)
        self.classifier = AwdLstmClassificationHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def encode(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BPT3C. Returns the kept last-layer outputs `(batch, kept_len, emb_size)`, the mask of positions each
        document pools over, and the index of each document's last real token in the kept outputs.

        Chunks start at multiples of `bptt` from each document's own first token, and a chunk is kept when it starts
        at most `max_len` tokens before the document's end: fastai's rule on an unpadded document, applied to each
        document alone so that padding and batch-mates never change a result. The state is detached between chunks
        (truncated backpropagation, as fastai), chunks no document keeps run without building a graph, and a chunk
        runs only the documents that have not ended (fastai's `real_bs`).
        """
        bptt, max_len = self.config.bptt, self.config.max_len
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        lengths = real.sum(1)
        if bool((lengths == 0).any()):
            rows = (lengths == 0).nonzero().squeeze(1).tolist()
            raise ValueError(f"Rows {rows} of the batch have no tokens (their attention mask is all zeros).")
        if not bool(real.all()):
            order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
            input_ids = input_ids.gather(1, order)
        if self.config.backwards:
            # A backward model reads each document from its last token (as its language model was trained).
            positions = torch.arange(input_ids.size(1), device=input_ids.device)[None, :]
            mirrored = lengths[:, None] - 1 - positions
            input_ids = input_ids.gather(1, torch.where(mirrored >= 0, mirrored, positions))
        # Longest document first, so the documents still running in a chunk are the first rows (fastai's `real_bs`):
        # a chunk runs only those, and the state of documents that have ended is dropped.
        by_length = torch.argsort(lengths, descending=True, stable=True)
        input_ids, lengths = input_ids[by_length], lengths[by_length]
        longest = int(lengths[0])
        input_ids = input_ids[:, :longest]  # columns past every document's end hold only padding
        # First kept chunk start of each document: the first multiple of bptt at or after length - max_len.
        first_kept = ((lengths - max_len).clamp_min(0) + bptt - 1) // bptt * bptt
        earliest_kept = int(first_kept.min())

        # Every row's real tokens come first, so the LSTMs read whole chunks (the fused kernels, no packing): an
        # output depends only on the tokens before it, and what they compute after a document's end is never pooled.
        cache, kept = None, []
        running = lengths.tolist()
        for start in range(0, longest, bptt):
            rows = sum(length > start for length in running)
            if cache is not None and rows < cache.states[0][0].size(1):
                cache = AwdLstmCache([(h[:, :rows], c[:, :rows]) for h, c in cache.states], cache.seen_tokens)
            with torch.set_grad_enabled(torch.is_grad_enabled() and start >= earliest_kept):
                out = self.model(input_ids=input_ids[:rows, start : start + bptt], cache=cache, use_cache=True)
            cache = out.cache.detach()
            if start >= earliest_kept:
                kept.append(F.pad(out.last_hidden_state, (0, 0, 0, 0, 0, input_ids.size(0) - rows)))
        restore = torch.argsort(by_length)
        hidden = torch.cat(kept, dim=1)[restore]
        lengths, first_kept = lengths[restore], first_kept[restore]
        positions = torch.arange(earliest_kept, longest, device=input_ids.device)[None, :]
        keep = (positions < lengths[:, None]) & (positions >= first_kept[:, None])
        return hidden, keep, lengths - 1 - earliest_kept

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        r"""
        labels (`(batch,)` or `(batch, num_labels)`, *optional*): class ids (single-label), floats (regression), or
            multi-hot floats (multi-label); `config.problem_type` picks the loss as in transformers.
        """
        if input_ids is None:
            raise ValueError("AwdLstmForSequenceClassification needs `input_ids` (BPT3C reads token ids in chunks).")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden, keep, last_index = self.encode(input_ids, attention_mask)
        logits = self.classifier(masked_concat_pool(hidden, keep, last_index))

        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        hidden_states = (hidden,) if output_hidden_states else None
        if not return_dict:
            output = tuple(v for v in (logits, hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


# Saved models name this file in `auto_map` and get a copy of it, so that they load without this package.
AwdLstmModel.register_for_auto_class("AutoModel")
AwdLstmForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AwdLstmForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "AUTO_MAP",
    "AwdLstmCache",
    "AwdLstmForCausalLM",
    "AwdLstmForSequenceClassification",
    "AwdLstmModel",
    "AwdLstmPreTrainedModel",
]
