"""AWD-LSTM for ULMFiT in transformers. Importing this package registers it with the Auto classes; each of its files
registers its own classes for the `auto_map` of saved folders, so that they load where the package is not installed."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .configuration_awd_lstm import CLASSIFIER_DROPOUTS, LM_DROPOUTS, AwdLstmConfig
from .kernels_awd_lstm import cpu_has_bf16_kernels
from .modeling_awd_lstm import (
    AwdLstmCache,
    AwdLstmForCausalLM,
    AwdLstmForSequenceClassification,
    AwdLstmModel,
    AwdLstmPreTrainedModel,
)
from .tokenization_awd_lstm import AwdLstmTokenizer

AutoConfig.register(AwdLstmConfig.model_type, AwdLstmConfig, exist_ok=True)
AutoModel.register(AwdLstmConfig, AwdLstmModel, exist_ok=True)
AutoModelForCausalLM.register(AwdLstmConfig, AwdLstmForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(AwdLstmConfig, AwdLstmForSequenceClassification, exist_ok=True)
AutoTokenizer.register(AwdLstmConfig, tokenizer_class=AwdLstmTokenizer, exist_ok=True)

__all__ = [
    "AwdLstmCache",
    "AwdLstmConfig",
    "AwdLstmForCausalLM",
    "AwdLstmForSequenceClassification",
    "AwdLstmModel",
    "AwdLstmPreTrainedModel",
    "AwdLstmTokenizer",
    "CLASSIFIER_DROPOUTS",
    "LM_DROPOUTS",
    "cpu_has_bf16_kernels",
]
