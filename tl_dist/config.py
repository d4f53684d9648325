"""Every option of a run: one typed dataclass, one line of help per field; the CLI is built from it.

The defaults reproduce the reference article: VGG16 with ImageNet weights, frozen conv features, a new
102-way last layer, SGD (lr 0.001, momentum 0.9), batch 32, 5 epochs, 224 px, an 80/20 split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tl_dist.console import CommandParser

DEFAULT_DATA_DIR = "./data/caltech-101"


def _opt(help: str, group: str, default=None, choices=None, **kw):
    return field(default=default, metadata=dict(help=help, group=group, choices=choices, **kw))


# --recipe: named presets of options. An option given on the command line (or in --config) wins over the
# recipe's value; config.json records the recipe and the values it resolved to. Where each value comes from:
# README, "Fine-tuning the backbone".
# The finetune preset's augmentation is torchvision's ResNet-50 recipe; its crops are cut from a cache 256/224
# of the image size (ImageNet's resize before the 224 crop) and evaluation resizes as the weights do.
FINETUNE = {"freeze": "none", "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "label_smoothing": 0.1,
            "warmup_epochs": 1.0, "lr_schedule": "cosine", "ema_decay": 0.9998,
            "augment": "trivial", "mixup": 0.2, "cutmix": 1.0, "random_erasing": 0.1,
            "cache_size": "8/7", "eval_resize": "weights"}
PROBE = {"probe_epochs": 5, "probe_lr": 1e-3}
RECIPES = {"article": {}, "finetune": FINETUNE, "lp-ft": {**FINETUNE, **PROBE}}


def _flags(values: dict) -> str:
    shown = {**values, "cache_size": "8/7 of --image-size"} if "cache_size" in values else values
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shown.items())


@dataclass
class Config:
    # --- Data ---
    data_dir: str = _opt("image-folder tree, one folder per class; downloaded from Kaggle only when left at "
                         "this default and missing", "Data", DEFAULT_DATA_DIR)
    output_dir: str | None = _opt("everything the run writes (default: runs/<date-time>)", "Data")
    image_size: int = _opt("images are resized to SIZE x SIZE", "Data", 224, positive=True)
    test_fraction: float = _opt("per-class fraction of images held out for testing", "Data", 0.2)
    val_fraction: float = _opt("per-class fraction of the training split held out for validation (0 = none, the "
                               "article's recipe): val/loss, val/accuracy, val/top5_accuracy after every epoch",
                               "Data", 0.0)
    max_samples: int = _opt("use about N images, each class keeping its share and at least one (0 = all); "
                            "for quick debug runs",
                            "Data", 0, nonnegative=True)
    num_workers: int = _opt("data-loader worker processes per training process (-1 = choose from the cores)",
                            "Data", -1)
    cache_dir: str = _opt("decoded-image cache (memory-mapped uint8 arrays); never inside --data-dir", "Data",
                          str(Path("~/.cache/tl_dist")))
    eval_resize: str = _opt("how evaluation resizes to --image-size: squash (the article's Resize((S, S))), weights "
                            "(the weights' own Resize(R) + CenterCrop(S), R scaled to S), or R (Resize(R) + "
                            "CenterCrop(S))", "Data", "squash")
    # --- Model ---
    model: str = _opt("network: vgg16 (the article), another torchvision classification network by name "
                      "(resnet50, efficientnet_b0, convnext_tiny, vit_b_16, ...; see --list-models), or "
                      "vgg_tiny, a small stand-in with VGG16's layout for tests", "Model", "vgg16")
    weights: str = _opt("imagenet (the network's DEFAULT torchvision weights; VGG16: IMAGENET1K_V1), a weights "
                        "name of the network (e.g. IMAGENET1K_V2), none (random init), or PATH to its "
                        "state_dict (.pth or .safetensors) with its 1000-way head", "Model", "imagenet")
    freeze: str = _opt("what trains: features = the classifier block on the frozen feature extractor (the "
                       "article); none = everything; last:N = the feature extractor's last N blocks and every "
                       "layer after them (--list-models shows each network's blocks)", "Model", "features")
    sync_bn: bool = _opt("BatchNorm statistics over every process's images (SyncBatchNorm), so that N processes "
                         "train like one with their global batch; for networks whose BatchNorm layers train",
                         "Model", False)
    dropout: float | None = _opt("dropout of the classifier block's dropout layers; None: the network's own "
                                 "(VGG16's two hidden layers: 0.5; ResNet's fc has none)", "Model", None)
    cache_features: str = _opt("train the classifier on backbone features computed once per image: auto = "
                               "exactly when that gives the same result (frozen backbone)", "Model", "auto",
                               choices=("auto", "on", "off"))
    # --- Optimisation ---
    recipe: str = _opt(f"article: the article's settings; finetune: {_flags(FINETUNE)}; lp-ft: finetune's, "
                       f"with {_flags(PROBE)} (the head alone on cached features first, Kumar et al., 2022). "
                       "Options given win over the recipe's", "Optimisation", "article", choices=tuple(RECIPES))
    epochs: int = _opt("passes over the training split (with --probe-epochs: of the fine-tuning)", "Optimisation", 5,
                       positive=True)
    batch_size: int = _opt("images per process and micro-batch; the global batch is this times the processes "
                           "times --gradient-accumulation-steps", "Optimisation", 32, positive=True)
    gradient_accumulation_steps: int | None = _opt(
        "micro-batches per optimizer step (default: $ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1)",
        "Optimisation", None, positive=True)
    optimizer: str = _opt("sgd (the article) or adamw (decoupled weight decay)", "Optimisation", "sgd",
                          choices=("sgd", "adamw"))
    lr: float = _opt("learning rate (of the head, with --backbone-lr-scale; not scaled with the global batch "
                     "unless --scale-lr)", "Optimisation", 0.001)
    scale_lr: bool = _opt("multiply --lr by the number of processes (linear scaling rule)", "Optimisation",
                          False)
    momentum: float = _opt("SGD momentum", "Optimisation", 0.9)
    weight_decay: float = _opt("weight decay of the convolution and linear weights (never of biases, "
                               "normalisation weights or transformer embeddings): L2 for SGD, decoupled for AdamW",
                               "Optimisation", 0.0)
    label_smoothing: float = _opt("the target becomes (1 - eps) x one-hot + eps / classes", "Optimisation", 0.0)
    warmup_epochs: float = _opt("linear warm-up of the lr over these epochs (fractions work), then "
                                "--lr-schedule", "Optimisation", 0.0)
    lr_schedule: str = _opt("after the warm-up: constant (the article) or a cosine decay to 0 at the last step",
                            "Optimisation", "constant", choices=("constant", "cosine"))
    backbone_lr_scale: float = _opt("the layers before the classifier block (the pretrained ones) train at "
                                    "--lr times this", "Optimisation", 1.0)
    clip_grad_norm: float = _opt("clip the global batch's gradient to this norm (0 = no clipping)", "Optimisation",
                                 0.0)
    ema_decay: float = _opt("keep an exponential moving average of the weights with this decay per step (0 = "
                            "none); it is evaluated beside the weights, and is the final model", "Optimisation", 0.0)
    probe_epochs: int = _opt("LP-FT: first train the classifier block alone for N epochs on cached features of "
                             "the frozen backbone, then --epochs of --freeze's training from it (0 = no probe)",
                             "Optimisation", 0, nonnegative=True)
    probe_lr: float | None = _opt("the learning rate of the --probe-epochs (default: --lr)", "Optimisation")
    seed: int = _opt("seed of the split, the initialisation, the shuffling, the augmentation and dropout", "Optimisation", 0)
    max_steps: int = _opt("stop after this many optimizer steps in total (0 = no limit); for debug runs",
                          "Optimisation", 0, nonnegative=True)
    # --- Augmentation (training images only; drawn per image from --seed, epoch and index: augment.py) ---
    augment: str = _opt("per-image policy: none (the article), basic (random resized crop + horizontal flip), "
                        "trivial (basic + TrivialAugmentWide)", "Augmentation", "none",
                        choices=("none", "basic", "trivial"))
    crop_scale: tuple[float, float] = _opt("random resized crop: range of the box's share of the image's area",
                                           "Augmentation", (0.08, 1.0), nargs=2)
    crop_ratio: tuple[float, float] = _opt("random resized crop: range of the box's aspect ratio (width / height)",
                                           "Augmentation", (3 / 4, 4 / 3), nargs=2)
    hflip: float = _opt("probability of a horizontal flip (with --augment basic or trivial)", "Augmentation", 0.5,
                        metavar="P")
    random_erasing: float = _opt("probability of erasing a random box of each image (torchvision's "
                                 "RandomErasing; 0 = off)", "Augmentation", 0.0, metavar="P")
    mixup: float = _opt("mixup alpha: images mixed with weight ~ Beta(alpha, alpha), soft targets (0 = off)",
                        "Augmentation", 0.0, metavar="ALPHA")
    cutmix: float = _opt("cutmix alpha (0 = off); with --mixup too, each step does one of them at random",
                         "Augmentation", 0.0, metavar="ALPHA")
    cache_size: int = _opt("side of the cached images random crops are cut from (0 = --image-size); larger keeps "
                           "their detail, e.g. 256 for 224 px crops", "Augmentation", 0, nonnegative=True)
    # --- Speed ---
    mixed_precision: str | None = _opt("autocast dtype (default: what accelerate launch was given)", "Speed",
                                       None, choices=("no", "fp16", "bf16"))
    channels_last: bool = _opt("NHWC memory format for the conv layers (faster on tensor cores)", "Speed",
                               False)
    compile: bool = _opt("torch.compile the network", "Speed", False)
    grad_compression: str = _opt("compress DDP gradients before the all-reduce (several processes only)",
                                 "Speed", "none", choices=("none", "bf16", "fp16"))
    num_threads: int = _opt("CPU threads per process (0 = the cores this process may use / local processes)",
                            "Speed", 0, nonnegative=True)
    # --- Checkpoints ---
    resume: str | None = _opt("auto (latest complete checkpoint in --output-dir, or a fresh start) or PATH",
                              "Checkpoints")
    eval_only: bool = _opt("evaluate the resumed model on the run's saved split; train nothing",
                           "Checkpoints", False)
    checkpoint_every_epochs: int = _opt("save a checkpoint every N epochs (0 = never)", "Checkpoints", 1,
                                        nonnegative=True)
    checkpoint_every_steps: int = _opt("save a checkpoint every N optimizer steps (0 = never)",
                                       "Checkpoints", 0, nonnegative=True)
    keep_checkpoints: int = _opt("checkpoints kept; older ones are deleted once a new one is complete",
                                 "Checkpoints", 2, positive=True)
    max_skipped_steps: int = _opt("fp16: stop when the grad scaler skips this many steps in a row",
                                  "Checkpoints", 50, positive=True)
    # --- Tracking ---
    # W&B's own environment variables give the defaults (flag > $WANDB_... > ours): tracking.wandb_run.
    wandb_project: str | None = _opt("W&B project (default: $WANDB_PROJECT, else transfer_learn_pytorch)",
                                     "Tracking")
    wandb_entity: str | None = _opt("W&B user or team (default: $WANDB_ENTITY, else your W&B default)",
                                    "Tracking")
    wandb_run_name: str | None = _opt("W&B run name (default: $WANDB_NAME, else the output folder's name)",
                                      "Tracking")
    wandb_group: str | None = _opt("W&B run group (default: $WANDB_RUN_GROUP)", "Tracking")
    wandb_tags: str | None = _opt("comma-separated W&B tags (default: $WANDB_TAGS)", "Tracking")
    wandb_log_model: bool = _opt("log the final model/ folder as a W&B artifact of type model, with the test "
                                 "metrics as its metadata", "Tracking", False)
    wandb_mode: str | None = _opt("W&B mode (default: $WANDB_MODE; offline when no W&B credentials)",
                                  "Tracking", None, choices=("online", "offline", "disabled"))
    log_every: int = _opt("in a log without a terminal, a progress line at least every N seconds (and at every "
                          "tenth of a phase or epoch); W&B gets every step", "Tracking", 30, positive=True)
    config: str | None = _opt("a JSON or YAML file of options (a run's own config.json too): it gives the "
                              "defaults, flags on the command line win", "Tracking")
    # the options given on the command line or in --config (not a flag): what --resume checks
    given: frozenset = field(default=frozenset(), repr=False, compare=False, metadata=dict(internal=True))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}

    @property
    def uses_feature_cache(self) -> bool:
        """The classifier block trains on backbone features cached once per image (auto: when the backbone
        is frozen, which makes it the same training)."""
        return self.cache_features == "on" or (self.cache_features == "auto" and self.freeze == "features"
                                               and not self.augments)

    @property
    def augments(self) -> bool:
        """Training images are augmented, so the network sees other images than stored features are of."""
        return self.augment != "none" or bool(self.random_erasing or self.mixup or self.cutmix)

    @property
    def total_epochs(self) -> int:
        """The run's epochs: the probe's (LP-FT), then the fine-tuning's."""
        return self.probe_epochs + self.epochs


# What defines a run: a resume must not change these (one line per difference), and a run's config.json
# gives them back. --batch-size is checked as the global batch, so that a run can resume on another number
# of processes (resume.py).
RUN_DEFINING = ("model", "weights", "freeze", "dropout", "image_size", "seed", "test_fraction", "val_fraction",
                "max_samples", "lr", "momentum", "scale_lr", "lr_schedule", "recipe", "sync_bn", "optimizer",
                "weight_decay", "label_smoothing", "warmup_epochs", "backbone_lr_scale", "clip_grad_norm",
                "ema_decay", "probe_epochs", "probe_lr",
                "eval_resize", "augment", "crop_scale", "crop_ratio", "hflip", "random_erasing", "mixup", "cutmix",
                "cache_size")
@dataclass(frozen=True)
class RunFacts:
    """What a run writes into its config.json besides its options: what it resolved and found. Ignored when
    such a file is read back as options (DERIVED)."""
    num_processes: int
    gradient_accumulation_resolved: int
    global_batch_size: int
    effective_lr: float
    num_classes: int
    train_samples: int
    val_samples: int
    test_samples: int
    device: str
    mixed_precision_resolved: str
    feature_cache: bool
    steps_per_epoch: int
    output_dir_resolved: str
    cpu_threads: int
    mean: list[float]  # the input normalisation of the network's weights
    std: list[float]


    def describe(self, per_process_batch: int) -> str:
        """The set-up in one line, as a run prints it at the start."""
        accumulation = self.gradient_accumulation_resolved
        return (f"{self.num_classes} classes, {self.train_samples} train / "
                + (f"{self.val_samples} validation / " if self.val_samples else "") + f"{self.test_samples} test "
                f"images; {self.num_processes} process(es) on {self.device}, precision "
                f"{self.mixed_precision_resolved}; global batch {self.global_batch_size} ({per_process_batch} per "
                f"process" + (f" x {accumulation} accumulation steps" if accumulation > 1 else "")
                + f"), lr {self.effective_lr:g}; run folder {self.output_dir_resolved}")


DERIVED = tuple(f.name for f in dataclasses.fields(RunFacts))
NOT_FROM_FILES = ("resume", "eval_only", "config")  # what to do with a run, not what the run is


def as_saved(value):
    """An option's value as config.json holds it, to compare with a saved one (JSON has no tuples)."""
    return list(value) if isinstance(value, tuple) else value


def _given_parser() -> argparse.ArgumentParser:
    """The same flags with no defaults: its namespace holds only what the command line gave."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="tl_dist.train", description="Fine-tune VGG16 (or another torchvision network) on Caltech-101 with "
        "Accelerate.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if meta.get("internal"):
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if f.type == "bool":
            group.add_argument(_flag(f.name), action="store_true", help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)  # "int | None": an int or unset
        if meta.get("nargs"):  # "tuple[float, float]": two numbers, LO HI
            kind, metavar = float, ("LO", "HI")
        else:
            metavar = None if meta["choices"] else meta.get("metavar", f.name.split("_")[-1].upper())
        group.add_argument(_flag(f.name), type=kind, default=f.default, choices=meta["choices"],
                           nargs=meta.get("nargs"), metavar=metavar, help=meta["help"])
    groups["Model"].add_argument("--list-models", action=_ListModels,
                                 help="print the networks --model takes, their weights, their blocks and the block "
                                      "--freeze features trains; exit")
    return parser


def read_options_file(path: str | Path) -> dict:
    """Options from a JSON or YAML file, by their names (dashes or underscores). A run's config.json works:
    its derived entries are left out."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:  # its message names the line and column
            raise ValueError(" ".join(str(exc).split())) from None
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"holds a {type(values).__name__}, not a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in values.items() if k not in DERIVED and k not in NOT_FROM_FILES}


def _file_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """--config FILE as parser defaults, each checked as if it were given on the command line."""
    try:
        values = read_options_file(path)
    except (OSError, ValueError) as exc:
        parser.error(f"argument --config: cannot read {path} ({type(exc).__name__}: {exc})")
    known = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - set(known))
    if unknown:
        parser.error(f"argument --config: {path} has unknown option(s): {', '.join(unknown)}")
    argv = []
    for name, value in values.items():
        if known[name].type == "bool":
            argv += [_flag(name)] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [_flag(name), *map(str, value)]
        elif value is not None:
            argv += [_flag(name), str(value)]
    parsed = vars(parser.parse_args(argv))  # the same type checks and choices as flags
    return {name: parsed[name] for name in values}


class _ListModels(argparse.Action):
    """Prints the table and exits, as --help does; it is no option of a run."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from tl_dist.model import describe_models

        print(describe_models())
        parser.exit()


def check_network(parser: argparse.ArgumentParser, cfg: Config) -> None:
    """--model, --weights, --image-size and --freeze together, before anything is read or written."""
    from tl_dist.model import check_freeze, check_image_size, check_model, check_weights

    if problem := check_model(cfg.model):
        parser.error(f"argument --model: {problem}")
    if problem := check_weights(cfg.model, cfg.weights):
        parser.error(f"argument --weights: {problem}")
    if problem := check_image_size(cfg.model, cfg.image_size):
        parser.error(f"argument --image-size: {problem}")
    if problem := check_freeze(cfg.model, cfg.freeze):
        parser.error(f"argument --freeze: {problem}")


def check_memory(cfg: Config) -> None:
    """One batch of the run (its options resolved: a resume's come from its checkpoint) must fit in the memory
    of the device it trains on; an argparse error (exit 2) says what would."""
    import torch

    from tl_dist.capacity import memory_problem

    device = torch.device("cpu")
    if torch.cuda.is_available():  # as Accelerate chooses it
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if problem := memory_problem(cfg.model, cfg.image_size, cfg.batch_size, device):
        build_parser().error(f"argument --image-size: {problem}")


def parse_args(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    given = set(vars(_given_parser().parse_known_args(argv)[0]))
    if "config" in given:
        config_file = vars(_given_parser().parse_known_args(argv)[0])["config"]
        from_file = _file_defaults(parser, config_file)
        parser.set_defaults(**from_file)
        given |= set(from_file)
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in vars(parser.parse_args(argv)).items()}
    cfg = Config(**values, given=frozenset(given))
    cfg = dataclasses.replace(cfg, **{k: _resolve(cfg, k, v) for k, v in RECIPES[cfg.recipe].items()
                                      if k not in given})
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.metadata.get("positive") and value is not None and value <= 0:
            parser.error(f"argument {_flag(f.name)}: must be a positive integer, got {value}")
        if f.metadata.get("nonnegative") and value < 0:
            parser.error(f"argument {_flag(f.name)}: must be 0 or more, got {value}")
    if not 0.0 < cfg.test_fraction < 1.0:
        parser.error(f"argument --test-fraction: must be between 0 and 1, got {cfg.test_fraction}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        parser.error(f"argument --val-fraction: must be 0 or more and below 1, got {cfg.val_fraction}")
    if not 0 < cfg.lr < 3e38:  # 3e38: the largest float32, which the optimizer computes in
        parser.error(f"argument --lr: must be positive and below 3e38, got {cfg.lr}")
    if not 0.0 <= cfg.momentum < 1.0:
        parser.error(f"argument --momentum: must be in [0, 1), got {cfg.momentum}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        parser.error(f"argument --dropout: must be in [0, 1), got {cfg.dropout}")
    _check_recipe_options(parser, cfg)
    if cfg.num_workers < -1:
        parser.error(f"argument --num-workers: must be -1 or more, got {cfg.num_workers}")
    _check_augmentation(parser, cfg)
    _check_paths_and_workers(parser, cfg)
    check_network(parser, cfg)
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_dir():
        parser.error(f"argument --resume: {cfg.resume!r} is neither auto nor an existing checkpoint folder")
    if cfg.eval_only and cfg.resume is None:
        parser.error("argument --eval-only: needs --resume auto or --resume PATH (the model to evaluate)")
    if cfg.resume == "auto" and cfg.output_dir is None:
        parser.error("argument --resume: auto needs --output-dir (the run folder to resume)")
    if cfg.cache_features == "on" and cfg.freeze != "features":
        parser.error("argument --cache-features: on needs --freeze features (a trained backbone changes "
                     "its features every step)")
    cfg.cache_dir = os.path.expanduser(cfg.cache_dir)
    return cfg


def _check_augmentation(parser: argparse.ArgumentParser, cfg: Config) -> None:
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        parser.error(f"argument --crop-scale: needs 0 < LO <= HI <= 1 (shares of the image's area), got {lo} {hi}")
    lo, hi = cfg.crop_ratio
    if not 0 < lo <= hi:
        parser.error(f"argument --crop-ratio: needs 0 < LO <= HI (aspect ratios, width / height), got {lo} {hi}")
    for name in ("hflip", "random_erasing"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            parser.error(f"argument {_flag(name)}: a probability, in [0, 1]; got {getattr(cfg, name)}")
    for name in ("mixup", "cutmix"):
        if not 0.0 <= getattr(cfg, name) < 1e6:
            parser.error(f"argument {_flag(name)}: the alpha of Beta(alpha, alpha), 0 (off) or more; got "
                         f"{getattr(cfg, name)}")
    if cfg.cache_size and cfg.cache_size < cfg.image_size:
        parser.error(f"argument --cache-size: {cfg.cache_size} is below --image-size {cfg.image_size}; pass 0 "
                     f"(the image size) or at least {cfg.image_size}")
    if cfg.eval_resize not in ("squash", "weights") and not (cfg.eval_resize.isdigit()
                                                              and int(cfg.eval_resize) >= cfg.image_size):
        parser.error(f"argument --eval-resize: squash, weights, or a size of at least --image-size "
                     f"{cfg.image_size} (the shorter side before the centre crop); got {cfg.eval_resize!r}")
    if cfg.cache_features == "on" and cfg.augments:
        parser.error("argument --cache-features: on trains on stored features of unaugmented images; with "
                     "augmentation, leave it at auto (or off)")


def _resolve(cfg: Config, name: str, value):
    """A recipe's value; "8/7" for --cache-size is that fraction of --image-size (256 for 224)."""
    if name == "cache_size" and isinstance(value, str):
        top, bottom = map(int, value.split("/"))
        return cfg.image_size * top // bottom
    return value


def _check_recipe_options(parser: argparse.ArgumentParser, cfg: Config) -> None:
    """The optimiser's, the schedule's and LP-FT's options, each in its range and meaningful together."""
    ranges = {"weight_decay": (0.0, 1e9), "label_smoothing": (0.0, 1.0), "clip_grad_norm": (0.0, 1e30),
              "ema_decay": (0.0, 1.0)}  # [low, high)
    for name, (low, high) in ranges.items():
        if not low <= getattr(cfg, name) < high:
            parser.error(f"argument {_flag(name)}: must be in [{low:g}, {high:g}), got {getattr(cfg, name)}")
    if not 0.0 < cfg.backbone_lr_scale <= 1e6:
        parser.error(f"argument --backbone-lr-scale: must be positive, got {cfg.backbone_lr_scale} (to keep "
                     "layers as they are, use --freeze)")
    if cfg.probe_lr is not None and not 0 < cfg.probe_lr < 3e38:
        parser.error(f"argument --probe-lr: must be positive and below 3e38, got {cfg.probe_lr}")
    if not 0.0 <= cfg.warmup_epochs < cfg.epochs:
        parser.error(f"argument --warmup-epochs: must be 0 or more and below --epochs ({cfg.epochs}), got "
                     f"{cfg.warmup_epochs}{_from_recipe(cfg, 'warmup_epochs')}")
    if cfg.optimizer != "sgd" and cfg.momentum != Config.momentum:  # a run's own config.json holds the default
        parser.error(f"argument --momentum: SGD's; {cfg.optimizer} has none (drop --momentum, or pass "
                     "--optimizer sgd)")
    if cfg.probe_epochs and cfg.freeze == "features":
        parser.error(f"argument --probe-epochs{_from_recipe(cfg, 'probe_epochs')}: the probe trains the "
                     "classifier block before the rest of the network trains; pass --freeze none or last:N")


def _from_recipe(cfg: Config, name: str) -> str:
    """Where a value that was not given came from, for an error message."""
    return "" if name in cfg.given else f" (the {cfg.recipe} recipe's value; pass your own)"


def _check_paths_and_workers(parser: argparse.ArgumentParser, cfg: Config) -> None:
    """Options that would harm the machine, or paths that cannot work, refused before anything runs (the
    network's own limits, --image-size among them: check_network)."""
    # Each worker is a process of its own; more of them than cores cannot load batches faster, and
    # torch's DataLoader itself warns above this number. 1000 of them once ran a machine out of memory.
    from tl_dist.runtime import usable_cores

    cores = usable_cores()
    if cfg.num_workers > cores:
        parser.error(f"argument --num-workers: {cfg.num_workers} is more than the {cores} CPU core(s) this "
                     f"process may use; pass at most {cores}, or -1 to choose from the cores")
    for name in ("data_dir", "output_dir", "cache_dir"):
        value = getattr(cfg, name)
        if value is None:
            continue
        path = Path(os.path.expanduser(value))
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if file is not None:
            parser.error(f"argument {_flag(name)}: {file} is a file, not a folder; pass a folder"
                         + (" that holds one sub-folder per class" if name == "data_dir" else ""))
        # The run writes into both: say so before any folder is made (access() sees read-only mounts too).
        existing = next(p for p in (path, *path.parents) if p.exists())
        if name != "data_dir" and not os.access(existing, os.W_OK | os.X_OK):
            parser.error(f"argument {_flag(name)}: {path} cannot be written ({existing} is read-only or not "
                         f"yours); pass a folder you can write to")
    # What the run writes must not land among the images: a cache file in the data folder makes its class
    # folders unreadable as such, and a run folder inside it becomes a class of the next run.
    data_dir = Path(os.path.expanduser(cfg.data_dir)).resolve()
    for name in ("cache_dir", "output_dir"):
        value = getattr(cfg, name)
        if value is not None and data_dir in (path := Path(os.path.expanduser(value)).resolve(), *path.parents):
            parser.error(f"argument {_flag(name)}: {value} is inside --data-dir {cfg.data_dir} (the images); "
                         "pass a folder outside it")
