"""RunConfig: the typed description of a run, its sections and their cross-field rules
(loading, overrides and error formatting are in config_io.py).

Imports neither torch nor accelerate, so a bad config is reported in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from toolkit.manifest import shard_defaults
from toolkit.names import DATASETS, SEED_MODELS

DatasetName = Literal[tuple(DATASETS)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(Section):
    # mixup/cutmix (toolkit/mix.py): whole batches on the training device, soft targets
    mixup_alpha: float = Field(0.0, ge=0, description="mixup: blend each batch with itself reversed, weight drawn from Beta(alpha, alpha) per batch; targets blended alike (soft-target cross-entropy, with train.label_smoothing). 0 = off; 0.2-0.4 is usual.")
    cutmix_alpha: float = Field(0.0, ge=0, description="cutmix: paste a box of the reversed batch, its area share drawn from Beta(alpha, alpha) per batch; targets weighted by area. 0 = off; 1.0 is usual. With mixup too, each mixed batch uses one of the two, half the time each.")
    mix_prob: float = Field(1.0, ge=0, le=1, description="Share of training batches mixed when mixup_alpha or cutmix_alpha is on; train accuracy is then counted against each image's dominant label.")
    crop_padding: int = Field(0, ge=0, description="Random crop of image_size after zero padding by this many pixels (0 = off).")
    hflip: bool = Field(False, description="Random horizontal flip with probability 0.5.")
    resized_crop_scale: Optional[list[float]] = Field(None, min_length=2, max_length=2, description="Random resized crop (torchvision's RandomResizedCrop, first of the augmentations): a box of this range of the image's area, e.g. [0.08, 1.0] as ImageNet training uses, resized back to image_size; null = off.")
    resized_crop_ratio: list[float] = Field([3 / 4, 4 / 3], min_length=2, max_length=2, description="Random resized crop: range of the box's width / height.")
    trivial_augment: bool = Field(False, description="TrivialAugment (torchvision's TrivialAugmentWide): per image one of 14 operations at a random strength.")
    color_jitter: float = Field(0.0, ge=0, le=1, description="Colour jitter: brightness, contrast and saturation each scaled by a factor drawn from [1 - x, 1 + x], in a random order per image (no hue); 0 = off.")
    random_erasing: float = Field(0.0, ge=0, le=1, description="Random erasing (torchvision's RandomErasing, last): probability of filling a random box (2-33% of the area) with the mean colour; 0 = off.")

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        problems = []
        for key, top in (("resized_crop_scale", 1.0), ("resized_crop_ratio", None)):
            pair = getattr(self, key)
            if pair is not None and not (0 < pair[0] <= pair[1] and (top is None or pair[1] <= top)):
                allowed = "0 < low <= high <= 1" if top else "0 < low <= high"
                problems.append((key, list(pair), f"must be [low, high] with {allowed}"))
        if problems:
            raise _cross_field_error(problems)
        return self

    @property
    def imagenet_style(self) -> bool:
        """Whether any of the torchvision-style augmentations is on (a per-sample transform in the loader pipeline)."""
        return bool(self.resized_crop_scale or self.trivial_augment or self.color_jitter or self.random_erasing)


class DataConfig(Section):
    name: DatasetName = Field("synthetic", description="Dataset: synthetic and digits need no download; mnist, fashion_mnist, cifar10, cifar100 are torchvision datasets under `root`; imagefolder reads class folders under `root`; shards streams the tar shards `toolkit shard` wrote (from `root`, a directory or URL).")
    root: Optional[str] = Field(None, description="Directory of the dataset (torchvision datasets and imagefolder). Relative paths are relative to the working directory. shards: the directory `toolkit shard` wrote, its http(s) URL (manifest.json read there), or a brace pattern of shard URLs (http://host/d/{train,val}-{000000..000099}.tar) with manifest.json beside them.")
    download: bool = Field(False, description="Let torchvision download a missing dataset into `root` (needs internet).")
    image_size: Optional[int] = Field(None, gt=0, description="Square side the model sees; null = the dataset's own (28 for MNIST, 32 for CIFAR, 8 for digits).")
    channels: Optional[Literal[1, 3]] = Field(None, description="1 = grayscale, 3 = RGB; null = the dataset's own. Images are converted either way.")
    resize: Literal["resize", "resize_center_crop"] = Field("resize", description="How images reach image_size: squash, or the central square (the region ImageNet's short side + centre crop keeps), cropped before resizing so the cost is bounded whatever the shape (preprocess_version 2).")
    mean: Optional[list[float]] = Field(None, description="Per-channel normalisation mean on the 0..1 scale; null = the dataset's default.")
    std: Optional[list[float]] = Field(None, description="Per-channel normalisation std; null = the dataset's default.")
    num_classes: int = Field(10, ge=2, description="Number of classes (synthetic data only; other sources read it from the data).")
    synthetic_samples: int = Field(1024, ge=2, description="Number of images (synthetic data only), before the validation split.")
    batch_size: Union[int, Literal["auto"]] = Field(64, description="Images per process per step (before gradient accumulation); auto: the largest that fits in the device's memory, halving from auto_batch_size_max, the smallest over all processes, printed at the start, recorded in the run's config.yaml and summary.json and reused on resume.")
    auto_batch_size_max: int = Field(256, gt=0, description="batch_size auto: the size the search starts at and never exceeds (on the CPU, where memory does not run out the same way, the search lands here).")
    eval_batch_size: Optional[int] = Field(None, gt=0, description="Images per process per evaluation step; null = 2 x batch_size.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the training set held out for validation where the source has no validation split.")
    split_seed: int = Field(0, description="Seed of the train/validation split (kept apart from train.seed so the split never moves).")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (per-sample pipeline only).")
    pipeline: Literal["auto", "memory", "loader"] = Field("auto", description="memory: decode once into a uint8 tensor and augment whole batches; loader: per-sample DataLoader; auto: memory when it fits under memory_limit_mb. A shard set is always streamed (auto).")
    shuffle_buffer: int = Field(1024, gt=0, description="shards: training samples a worker reads and shuffles together (rounded down to whole batches), after the shard order is shuffled per epoch; a worker holds a block's encoded bytes, the loader up to a block of decoded batches per worker.")
    skip_bad_samples: bool = Field(False, description="shards: leave out a sample that cannot be read (corrupt or truncated shard, no label, HTTP error) and count it on the epoch line, instead of stopping the run naming the shard and sample.")
    memory_limit_mb: float = Field(4096, gt=0, description="Largest uint8 dataset (train + val) that `pipeline: auto` keeps in memory.")
    max_pixels: int = Field(40_000_000, gt=0, description="Largest image file (width x height) training reads, checked from the header before decoding; a larger file stops the run with its path (as serve.max_pixels answers 413).")
    max_side: int = Field(65_535, gt=0, description="Longest side of an image file training reads (PIL's cost grows with the rows: a 1 x 40,000,000 PNG takes 1.5 s and 0.3-0.8 GB); a longer file stops the run with its path.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training augmentation, applied to whole batches on the training device.")

    def resolved(self) -> "DataConfig":
        """This section with the dataset's own values filled in where it says null (image_size, channels,
        mean, std): what the run actually uses, recorded in the run's config.yaml and shown by `config show`."""
        spec = DATASETS[self.name]
        if self.name == "shards" and self.root and None in (self.image_size, self.channels, self.mean):
            spec = spec._replace(**shard_defaults(self.root))  # the shard set's own, from its manifest
        channels = self.channels or spec.channels
        mean, std = (self.mean, self.std) if self.mean is not None else (spec.mean, spec.std)
        if self.mean is None and len(mean) != channels:  # dataset defaults follow a channel conversion
            mean, std = ([sum(mean) / len(mean)], [sum(std) / len(std)]) if channels == 1 else (mean * 3, std * 3)
        if len(mean) == 1 and channels == 3:
            mean, std = mean * 3, std * 3
        return self.model_copy(update={"image_size": self.image_size or spec.image_size, "channels": channels,
                                       "mean": list(mean), "std": list(std)})

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        problems = []
        if DATASETS[self.name].needs_root and not self.root:
            problems.append(("root", None, f"is required for data.name {self.name!r}: the directory holding the dataset"))
        if self.name == "imagefolder" and self.root and not Path(self.root).is_dir():
            problems.append(("root", self.root, "does not exist or is not a directory (expected class folders, or train/ and val/ of class folders)"))
        if self.name in ("imagefolder", "shards") and self.download:
            problems.append(("download", True, f"{self.name} data cannot be downloaded"))
        if self.name == "shards" and self.pipeline != "auto":  # a shard set is always streamed
            problems.append(("pipeline", self.pipeline, "does not apply to data.name shards, which is always streamed (leave it auto)"))
        if isinstance(self.batch_size, int) and self.batch_size <= 0:
            problems.append(("batch_size", self.batch_size, "must be greater than 0, or auto"))
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and self.channels is not None and len(values) != self.channels:
                problems.append((key, values, f"needs {self.channels} value(s), one per channel"))
        if self.std is not None and any(s <= 0 for s in self.std):
            problems.append(("std", self.std, "values must be greater than 0"))
        if (self.mean is None) != (self.std is None):
            problems.append(("mean" if self.mean is None else "std", None, "mean and std are set together"))
        if problems:
            raise _cross_field_error(problems)
        return self


class ModelConfig(Section):
    name: str = Field("mnist_cnn", pattern=r"^[a-z][a-z0-9_]*$", description=f"A seed model ({', '.join(SEED_MODELS)}) or any torchvision classification model (resnet18, mobilenet_v3_small, ...).")
    args: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments of the model builder, e.g. {dropout: 0.5} for seed models.")
    pretrained_weights: Optional[str] = Field(None, description="Local file of weights (a state_dict) to start from; the classification head is replaced when its shape differs.")
    torchvision_weights: Optional[str] = Field(None, description="torchvision weights name to download (e.g. DEFAULT, IMAGENET1K_V1); needs internet.")
    freeze_backbone: bool = Field(False, description="Train only the new head; frozen BatchNorm layers stay in eval mode.")
    sync_batchnorm: bool = Field(False, description="Convert BatchNorm to SyncBatchNorm when several processes train.")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        problems = []
        if self.pretrained_weights and not Path(self.pretrained_weights).is_file():
            problems.append(("pretrained_weights", self.pretrained_weights, "is not a file"))
        if self.pretrained_weights and self.torchvision_weights:
            problems.append(("torchvision_weights", self.torchvision_weights, "cannot be combined with pretrained_weights"))
        if self.name in SEED_MODELS and self.torchvision_weights:
            problems.append(("torchvision_weights", self.torchvision_weights, f"only applies to torchvision models, not {self.name!r}"))
        if self.freeze_backbone and not (self.pretrained_weights or self.torchvision_weights):
            problems.append(("freeze_backbone", True, "freezes a backbone that has no weights loaded "
                             "(model.torchvision_weights and model.pretrained_weights are both null): only the head "
                             "would learn, on random features. Set model.freeze_backbone: false to train from "
                             "scratch, or load weights with one of those keys"))
        if problems:
            raise _cross_field_error(problems)
        return self


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = Field("adam", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, description="Learning rate (before lr_scaling).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for adamw).")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field("none", description="Scale lr with effective_batch_size / lr_base_batch_size.")
    lr_base_batch_size: Optional[int] = Field(None, gt=0, description="Batch size that lr was tuned for; null = data.batch_size (one process, no accumulation).")

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise _cross_field_error([("nesterov", True, "needs optim.name 'sgd' and momentum > 0")])
        return self


class ScheduleConfig(Section):
    name: Literal["none", "step", "cosine", "onecycle"] = Field("none", description="Learning-rate schedule, stepped once per optimizer step.")
    step_epochs: float = Field(5, gt=0, description="step: multiply lr by gamma every this many epochs.")
    gamma: float = Field(0.1, gt=0, le=1, description="step: decay factor.")
    warmup_epochs: float = Field(0, ge=0, description="Linear warm-up from 0 before step or cosine (onecycle has its own).")
    min_lr: float = Field(0.0, ge=0, description="cosine: final learning rate.")
    pct_start: float = Field(0.3, gt=0, lt=1, description="onecycle: share of steps spent increasing lr.")

    @model_validator(mode="after")
    def _check(self) -> "ScheduleConfig":
        if self.name == "onecycle" and self.warmup_epochs:
            raise _cross_field_error([("warmup_epochs", self.warmup_epochs, "does not apply to onecycle (use pct_start)")])
        return self


class EmaConfig(Section):
    decay: Optional[float] = Field(None, gt=0, lt=1, description="Keep an exponential moving average of the weights (and BatchNorm statistics), updated after every optimizer step on the device: ema = decay * ema + (1 - decay) * weights. null = off; 0.999-0.9999 is usual (about 1 / (1 - decay) steps of memory). Validation reports both (val_acc and val_acc_ema).")
    warmup: int = Field(0, ge=0, description="Optimizer steps over which the decay ramps up linearly from 0 (the first update copies the weights) to `decay`, so the average forgets the random start; 0 = `decay` from the first step.")
    use_for: Literal["best", "none"] = Field("best", description="best: checkpoints/best (hence export, evaluate, serving, top-k and early stopping) holds the EMA weights, chosen by the EMA's val accuracy; none: the trained weights, the EMA only reported.")


class TrainConfig(Section):
    epochs: int = Field(10, gt=0, description="Number of epochs.")
    run_name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._,=+-]*$", description="Run directory name under output_dir (letters, digits and . _ - , = +; toolkit sweep names runs lr=3e-4,batch_size=64); null = the config file's name.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="Autocast precision. auto: bf16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), fp16 on CUDA without bf16, else no; the start-up line and summary.json say which. fp16 needs CUDA (with a gradient scaler).")
    eval_precision: Literal["fp32", "train"] = Field("fp32", description="Precision of validation, hence of best_val_acc, the best checkpoint and early stopping. fp32: the model as `toolkit evaluate`, `toolkit predict`, the export and TorchServe run it, whatever the training precision; train: the training autocast (faster, but the figures are not those of the served model). metrics.jsonl and summary.json say which was used.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    clip_grad_norm: Optional[float] = Field(None, gt=0, description="Clip the global gradient norm to this value; null = off.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    seed: int = Field(42, description="Seed of model initialisation and of the training stream (offset per process).")
    patience: Optional[int] = Field(None, ge=1, description="Early stopping: stop after this many epochs without a better val accuracy; null = off.")
    resume: bool = Field(False, description="Continue the run in the run directory from checkpoints/last.")
    overwrite: bool = Field(False, description="Delete an existing run directory of the same name before starting.")
    stop_after: Optional[int] = Field(None, gt=0, description="Stop this invocation after this many epochs (for time-limited jobs); resume continues.")
    save_top_k: int = Field(0, ge=0, description="Also keep the k best epochs by val accuracy (of the model checkpoints/best holds) under checkpoints/top/, each loadable like checkpoints/best; `toolkit average RUN` averages them. 0 = off.")
    ema: EmaConfig = Field(default_factory=EmaConfig, description="Exponential moving average of the weights (toolkit/ema.py).")
    checkpoint_every: Optional[str] = Field(None, pattern=r"^[1-9][0-9]* ?(steps|min)$", description="Also write checkpoints/last inside an epoch, every this many optimizer steps (`500 steps`) or minutes (`30 min`), so a kill loses at most one interval; --resume continues at the next batch. null = at the end of each epoch only.")
    preempt_signals: list[Literal["SIGUSR1", "SIGUSR2", "SIGTERM", "SIGHUP"]] = Field(["SIGUSR1", "SIGTERM"], description="Signals that stop the run at the next point every process agrees on (at most 10 steps), after writing checkpoints/last mid-epoch: exit status 75, summary.json status `preempted`; resume with --resume. SIGUSR1 is Slurm's warning (`#SBATCH --signal=USR1@120` in launch/slurm.sbatch), SIGTERM its time limit and scancel. Ctrl-C (SIGINT) does the same (status `interrupted`); a second Ctrl-C stops at once.")
    collective_timeout_s: float = Field(300, gt=0, description="Seconds a process waits in a collective (gradients, barriers, checkpoint saves) for the others before it gives up: a dead node stops the run within this time with one message, instead of the process group's 30-minute default.")
    log_every: int = Field(50, gt=0, description="Steps between progress lines when stdout is not a terminal (a cluster log); each epoch's last step is always shown.")
    log_every_s: float = Field(30, ge=0, description="Also a progress line when this many seconds passed since the last one (stdout not a terminal), so a slow epoch shows life; 0 = steps only.")
    log_with: list[Literal["tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive"]] = Field([], description="Experiment trackers (Accelerate's) the run logs to, main process only: scalars at the reduce cadence, each epoch's metrics, the resolved config as hyperparameters. Each but tensorboard is an extra: pip install 'toolkit[mlflow,wandb]'. tensorboard writes RUN/tensorboard/; mlflow MLFLOW_TRACKING_URI's store, else RUN/mlruns/; wandb RUN/wandb/ (WANDB_MODE=offline to stay offline). `none` or a single name also read.")
    tracker_project: Optional[str] = Field(None, description="The trackers' project: TensorBoard's subdirectory, MLflow's experiment, W&B's project; null = the run name. Give sweeps' runs one project to see them together.")
    device: Literal["auto", "cpu"] = Field("auto", description="auto: CUDA or MPS when present, else CPU; cpu: always the CPU.")
    channels_last: bool = Field(True, description="channels_last memory format for model and batches (faster convolutions on CPUs and tensor-core GPUs; checkpoints and export are unaffected).")
    compile: bool = Field(False, description="torch.compile the model (checkpoints and export stay plain).")
    num_threads: Optional[int] = Field(None, gt=0, description="torch intra-op threads per process; null = torch's default.")

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _bare_steps(cls, value: Any) -> Any:
        # a bare number (`checkpoint_every: 500`, `--set train.checkpoint_every=500`) counts steps
        bare = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())
        return f"{value} steps" if bare else value

    @field_validator("log_with", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        # a single name (`log_with: tensorboard`), and `none` or null for none, as before lists
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` means the string
        return "no" if value is False else value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.resume and self.overwrite:
            raise _cross_field_error([("overwrite", True, "cannot be combined with train.resume: true")])
        return self


class ServeConfig(Section):
    batch_size: int = Field(8, gt=0, description="TorchServe dynamic batching: most requests per forward pass.")
    max_batch_delay_ms: int = Field(5, ge=0, description="How long TorchServe waits to fill a batch.")
    min_workers: int = Field(1, gt=0, description="Worker processes at start.")
    max_workers: int = Field(1, gt=0, description="Most worker processes.")
    response_timeout_s: int = Field(30, gt=0, description="Seconds before a worker is considered stuck.")
    topk: int = Field(5, gt=0, description="Classes in each answer (never more than the model has).")
    max_pixels: int = Field(40_000_000, gt=0, description="Largest image (width x height) the handler decodes; larger ones get 413, from the header, before any pixel is decoded.")
    max_side: int = Field(65_535, gt=0, description="Longest image side the handler decodes (65,535 is JPEG's own limit); longer ones get 413 from the header. PIL's cost grows with the rows: 1 x 40,000,000 pixels costs 1.5 s and 0.3-0.8 GB.")
    channels_last: Optional[bool] = Field(None, description="Memory format the handler feeds the model: "
                                          "null = channels_last for batches of 2+ and, for one image, the faster "
                                          "of the two timed at load; true or false = that format always.")
    precision: Literal["fp32", "bf16", "int8"] = Field("fp32", description="Arithmetic of the exported model: fp32; bf16 (torchscript, aoti: fast only on CPUs with AVX512-BF16/AMX and on GPUs, the export warns elsewhere); int8 (onnx, onnxruntime static quantization calibrated on 64 training images). A reduced precision is kept only if it gives fp32's class for at least 99.5% (bf16) or 99% (int8) of the validation images, measured at export and written to parity.json.")
    profile: bool = Field(False, description="Time the handler's phases per batch as TorchServe's metrics "
                          "ts_handler_preprocess, ts_handler_inference and ts_handler_postprocess (ms): "
                          "logged in ts_log.log, latest values at /metrics.")

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.max_workers < self.min_workers:
            raise _cross_field_error([("max_workers", self.max_workers, f"must be at least min_workers ({self.min_workers})")])
        return self


class ExportConfig(Section):
    format: Literal["auto", "torchscript", "onnx", "aoti"] = Field("auto", description="Format `toolkit export` writes and `toolkit archive` packs when the run has no current export: torchscript (model.pt), onnx (model.onnx, run by onnxruntime; needs pip install 'toolkit[onnx]') or aoti (model.pt2, compiled ahead of time by AOTInductor for this kind of CPU; needs a C++ compiler). Each is parity-checked against the checkpoint. auto: the format measured fastest through TorchServe for the model in two runs (docs/benchmarks.md): onnx for efficientnet_b0 where onnxruntime is installed, torchscript for every other model.")


class RunConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig, description="Where images come from and how they are prepared.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The network.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="The optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="The learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop and the run directory.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="The file a run is exported to for serving.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving settings written into the model archive.")

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / (self.train.run_name or "run")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def _check_auto_batch(self) -> "RunConfig":
        if self.data.batch_size == "auto" and self.optim.lr_scaling != "none" and not self.optim.lr_base_batch_size:
            raise _cross_field_error([("optim.lr_base_batch_size", None, "is required with data.batch_size auto and "
                                       "optim.lr_scaling: the batch size optim.lr was tuned for")])
        return self

    def resolved(self) -> "RunConfig":
        """The config with the data's own values in place of null (DataConfig.resolved)."""
        return self.model_copy(update={"data": self.data.resolved()})


class _CrossFieldProblem(ValueError):
    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, _, m in problems))


def _cross_field_error(problems: list[tuple[str, Any, str]]) -> _CrossFieldProblem:
    return _CrossFieldProblem(problems)
