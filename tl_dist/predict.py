"""Classify images with a fine-tuned model: `python -m tl_dist.predict --checkpoint DIR IMAGE_OR_FOLDER...`.

DIR is a run's output folder (its final model, `model/`, or else its newest checkpoint), the `model/`
folder itself, or one `checkpoints/step_N` folder. The class names come from its classes.json and the
network, image size and normalisation from the run's config.json, so neither --model nor a dataset is
needed. `tl_dist.load_model(DIR)` gives the same model to Python code (LoadedModel). Images go through the same
decoding and resizing as the run's evaluation (data.load_image, --eval-resize) and are batched; a file that cannot be read gets an
error (on stderr, or as a JSON line with an `error` field) and the others go on.

Exit status: 0 when every input was classified, 1 when some could not be read, 2 for a bad command line
or a DIR that holds no model.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_dist.capacity import memory_problem
from tl_dist.console import CommandParser, end_process
from tl_dist.checkpoint import CheckpointError, check_checkpoint, load_weights, read_classes, unloadable
from tl_dist.run_dir import CLASSES_FILE, CONFIG_FILE, FINAL_MODEL, WEIGHTS_FILE, RunDir, RunDirError, read_json
from tl_dist.data import IMAGE_EXTENSIONS, Resize, _hidden, load_image, normalize
from tl_dist.model import VisionTransformerNet, WeightsError, build_model, check_image_size, eval_resize

DEFAULT_IMAGE_SIZE = 224


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="tl_dist.predict", description="Top-k classes of images, from a fine-tuned tl_dist model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a run's output folder (its final model, else its newest checkpoint), its model/ "
                             "folder, or one checkpoints/step_N folder")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files, or folders searched recursively for images")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per input on stdout (unreadable ones with an `error` field)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize to SIZE x SIZE (default: the run's --image-size from its config.json)")
    return parser


# ---------------------------------------------------------------- the model


def resolve_model_dir(path: Path) -> Path:
    """The folder holding the weights: DIR itself, DIR/model, or the run's newest checkpoint."""
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path}: no such folder. Pass a run's output folder (with a "
                              f"{FINAL_MODEL}/ or checkpoints/step_N folder), or one of those folders.")
    if (path / WEIGHTS_FILE).is_file():
        check_checkpoint(path, "--checkpoint")  # one given explicitly: damaged is an error, not a fallback
        return path
    found = RunDir(path).latest(warn=lambda message: print(message, file=sys.stderr)) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"--checkpoint {path}: no model here. Pass a run's output folder (with a "
                              f"{FINAL_MODEL}/ or checkpoints/step_N folder), or one of those folders.")
    return found


def read_run_config(model_dir: Path) -> dict:
    """The run's config.json: beside the weights for a final model; in the run folder for a checkpoint."""
    for candidate in (model_dir / CONFIG_FILE, model_dir.parent.parent / CONFIG_FILE):
        if candidate.is_file():
            return read_json(candidate)
    return {}


@dataclass
class LoadedModel:
    """A fine-tuned network in eval mode and what it needs: its class names and its preprocessing
    (images resized to `image_size` x `image_size`, then normalised with `mean` and `std`)."""
    network: torch.nn.Module
    arch: str  # its --model: vgg16, resnet50, ...
    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_dir: Path  # the folder the weights came from
    config: dict  # the run's config.json ({} when none was found)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x S x S images (as `load_images` gives) -> the network's input, on its device."""
        device = next(self.network.parameters()).device
        return normalize(images.to(device), mean=self.mean, std=self.std)

    def resize(self, size: int | None = None) -> Resize:
        """How the run's evaluation resized its images (its --eval-resize), to `size` px (default: the run's)."""
        size = size or self.image_size
        mode = self.config.get("eval_resize", "squash")
        if mode not in ("squash", "weights"):  # Resize(R) then CenterCrop(S): R scales with S
            mode = str(int(mode) * size // self.image_size)
        return eval_resize(self.arch, self.config.get("weights", "none"), size, mode)

    def load_images(self, paths) -> torch.Tensor:
        """Image files -> uint8 N x 3 x S x S, decoded and resized as in the run's evaluation."""
        return torch.stack([torch.from_numpy(load_image(p, self.resize())).permute(2, 0, 1) for p in paths])

    @torch.inference_mode()
    def predict(self, paths) -> torch.Tensor:
        """Class probabilities (N x classes) of image files."""
        return torch.softmax(self.network(self.inputs(self.load_images(paths))).float(), dim=1)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A fine-tuned model from a run folder (its final model, else its newest checkpoint), its model/
    folder, or one checkpoints/step_N folder, on `device`. The network, image size and normalisation are
    the ones the run recorded in its config.json."""
    model_dir = resolve_model_dir(Path(path))
    if not (model_dir / CLASSES_FILE).is_file():
        raise CheckpointError(f"--checkpoint {model_dir}: has no {CLASSES_FILE}, so the class names are "
                              "unknown. Pass a folder written by tl_dist.train.")
    classes = read_classes(model_dir)
    config = read_run_config(model_dir)
    arch = config.get("model") or _guess_vgg(model_dir)
    image_size = config.get("image_size") or DEFAULT_IMAGE_SIZE
    weights = config.get("weights", "none")
    model = build_model(arch, len(classes), weights, "none", config.get("dropout"), image_size=image_size,
                        from_checkpoint=True)
    load_weights(model, model_dir, "--checkpoint")
    # The recorded normalisation; runs that did not record it were trained with ImageNet's (model.mean).
    mean, std = tuple(config.get("mean") or model.mean), tuple(config.get("std") or model.std)
    model.mean, model.std = mean, std
    return LoadedModel(model.eval().to(device), arch, classes, image_size, mean, std, model_dir, config)


def image_size_problem(model: LoadedModel, size: int) -> str | None:
    """Why the model cannot take SIZE x SIZE images, or None: a ViT's position embeddings were built for
    the size it was trained at."""
    if isinstance(model.network, VisionTransformerNet) and size != model.image_size:
        return f"this ViT was trained at {model.image_size} px and takes only that size"
    return check_image_size(model.arch, size)


def _guess_vgg(model_dir: Path) -> str:
    """A model folder without a config.json (copied out of its run): VGG16 (13 conv layers, the last is
    features.28) or the tiny stand-in, the only networks of tl_dist before it recorded its network."""
    from safetensors import safe_open

    with unloadable(model_dir, "--checkpoint"), safe_open(str(model_dir / WEIGHTS_FILE), "pt") as weights:
        deep = any(k.removeprefix("module.").startswith("features.28.") for k in weights.keys())
    return "vgg16" if deep else "vgg_tiny"


# ---------------------------------------------------------------- the inputs


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given (whatever their extension: a user who names a file means it); folders searched
    recursively for image files, in sorted order, hidden files left out as in training."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(_hidden(part) for part in p.relative_to(path).parts))
            paths += found or [path]  # an empty folder is reported as such
        else:
            paths.append(path)
    return paths


def read_image(path: Path, resize: Resize) -> tuple[torch.Tensor | None, str | None]:
    """(uint8 3 x S x S, None) or (None, why it cannot be read)."""
    if not path.exists():
        return None, "no such file or folder"
    if path.is_dir():
        return None, f"a folder with no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    if path.stat().st_size == 0:
        return None, "empty file (0 bytes)"
    try:
        return torch.from_numpy(load_image(path, resize)).permute(2, 0, 1), None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, the others go on
        return None, f"cannot be read as an image ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"


@torch.inference_mode()
def predict(model: LoadedModel, paths: list[Path], image_size: int, top_k: int, batch_size: int):
    """Yields one result dict per path, in order: {"file", "top_k": [{"class", "probability"}]} or
    {"file", "error"}. Decoding is threaded (PIL releases the GIL); the forward pass runs per batch."""
    with ThreadPoolExecutor(max(1, min(8, torch.get_num_threads()))) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            decoded = list(pool.map(lambda p: read_image(p, model.resize(image_size)), chunk))
            good = [img for img, _ in decoded if img is not None]
            if good:
                probs = torch.softmax(model.network(model.inputs(torch.stack(good))).float(), dim=1)
                top = probs.topk(top_k, dim=1)
                values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
            row = 0
            for path, (img, error) in zip(chunk, decoded):
                if img is None:
                    yield {"file": str(path), "error": error}
                    continue
                yield {"file": str(path), "top_k": list(zip(indices[row], values[row]))}
                row += 1


# ---------------------------------------------------------------- main


def choose_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """--device: auto (a CUDA GPU when there is one), or one this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"argument --device: {name!r} is not a device; pass auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {name}: this machine has no CUDA GPU; pass cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"argument --device: {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                     f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: {name}: pass auto, cpu, cuda or cuda:N")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or (args.image_size is not None and args.image_size < 1):
        parser.error("--top-k, --batch-size and --image-size must be positive")
    device = choose_device(parser, args.device)
    try:
        model = load_model(args.checkpoint, device)
    except (CheckpointError, WeightsError, RunDirError) as exc:
        parser.error(str(exc))
    model_dir, classes, config = model.model_dir, model.classes, model.config
    if args.image_size and (problem := image_size_problem(model, args.image_size)):
        parser.error(f"argument --image-size: {problem}")
    image_size = args.image_size or model.image_size
    if problem := memory_problem(model.arch, image_size, args.batch_size, device):
        parser.error(f"argument --image-size: {problem}")
    top_k = min(args.top_k, len(classes))
    paths = expand_inputs(args.inputs)
    info = sys.stderr
    print(f"model: {model_dir} ({model.arch}, {len(classes)} classes, "
          f"{image_size} px) on {device}; {len(paths)} image(s)", file=info)
    if not config:
        print(f"warning: no config.json found for {model_dir}; assuming {image_size} px images "
              "(set --image-size)", file=info)

    failed = 0
    for result in predict(model, paths, image_size, top_k, args.batch_size):
        failed += "error" in result
        if args.json:
            if "top_k" in result:
                result["top_k"] = [{"class": classes[c], "probability": round(p, 6)} for c, p in result["top_k"]]
            print(json.dumps(result), flush=True)
        elif "error" in result:
            print(f"error: {result['file']}: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(result["file"])
            for rank, (c, p) in enumerate(result["top_k"], 1):
                print(f"  {rank}. {classes[c]:<24} {p:7.2%}")
            sys.stdout.flush()
    if failed:
        print(f"{failed} of {len(paths)} input(s) could not be read", file=info)
    return 1 if failed else 0


if __name__ == "__main__":
    end_process(main())  # without Python's slow shutdown
