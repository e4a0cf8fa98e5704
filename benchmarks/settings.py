"""What the benchmarks measure: model sizes, batch sizes, how many batches, for the full run and the quick one."""

from dataclasses import asdict, dataclass, field

from modeling_awd_lstm import cpu_has_bf16_kernels


@dataclass(frozen=True)
class ModelSize:
    emb_size: int = 400
    hidden_size: int = 1152
    num_layers: int = 3


@dataclass(frozen=True)
class Settings:
    quick: bool = False
    model: ModelSize = field(default_factory=ModelSize)
    seed: int = 42
    threads: int = 0  # torch threads in every worker; 0: all cores
    # OpenMP threads sleep instead of spinning while they wait: on a machine other jobs share, spinning threads
    # stall each other for whole scheduler slices (seconds per step). "" leaves the environment's setting.
    omp_wait_policy: str = "PASSIVE"
    # Each implementation runs `repeats` times per setting, in ABBA order, each time in a fresh process.
    repeats: int = 2

    # 1. LM training: every combination of vocabulary, batch size and precision.
    lm_vocab_sizes: tuple[int, ...] = (30000, 60000)
    lm_batch_sizes: tuple[int, ...] = (32, 64)
    # bf16 only where the CPU has bf16 kernels: elsewhere oneDNN has no bf16 LSTM (fastai's side fails) and bf16
    # matrix products run hundreds of times slower than fp32.
    precisions: tuple[str, ...] = field(
        default_factory=lambda: ("fp32", "bf16") if cpu_has_bf16_kernels() else ("fp32",)
    )
    bptt: int = 70
    lm_warmup_batches: int = 1
    lm_timed_batches: int = 3
    lr: float = 2e-3
    # The quality run: the first repeat of this setting trains `quality_batches` from the shared initial weights,
    # then both sides report validation perplexity (fp32 evaluation) on `eval_batches` batches of held-out text.
    quality_vocab: int = 30000
    quality_batch_size: int = 32
    quality_batches: int = 12
    eval_batches: int = 8

    # 2-3. Classifier (ULMFiT's: BPT3C with bptt 72, pooling over the last 1440 tokens, drop_mult 0.5).
    clas_vocab: int = 30000
    clas_bptt: int = 72
    clas_max_len: int = 1440
    clas_train_batch_size: int = 32
    clas_warmup_batches: int = 1
    clas_timed_batches: int = 2
    infer_docs: int = 1000
    infer_repeats: int = 1  # each inference run already times every batch of the 1,000 reviews
    infer_batch_size: int = 64
    single_docs: int = 50  # one-at-a-time prediction on the first `single_docs` of the `infer_docs`

    # 4. Generation.
    gen_vocab: int = 30000
    prompt_tokens: int = 20
    new_tokens: int = 100
    gen_runs: int = 3  # timed generations per run of ours (fastai's predict is timed once per run: it is slow)

    # Data: how many IMDb training reviews build the vocabulary (with WikiText-2), fastai's make_vocab rule.
    vocab_imdb_docs: int = 25000
    min_freq: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Settings()

QUICK = Settings(
    quick=True,
    model=ModelSize(emb_size=32, hidden_size=48, num_layers=3),
    threads=1,  # tiny ops gain nothing from a second thread
    repeats=1,
    lm_vocab_sizes=(2000,),
    lm_batch_sizes=(8,),
    bptt=20,
    lm_warmup_batches=1,
    lm_timed_batches=2,
    quality_vocab=2000,
    quality_batch_size=8,
    quality_batches=4,
    eval_batches=2,
    clas_vocab=2000,
    clas_bptt=20,
    clas_max_len=60,
    clas_train_batch_size=8,
    clas_warmup_batches=1,
    clas_timed_batches=1,
    infer_docs=24,
    infer_batch_size=8,
    single_docs=3,
    gen_vocab=2000,
    prompt_tokens=20,
    new_tokens=10,
    gen_runs=1,
    vocab_imdb_docs=100,
    min_freq=2,
)
