"""The reference article's plain PyTorch loop, copied faithfully: the baseline of benchmarks/bench.py.

Same as the article ("Transfer learning using Pytorch", W&B): ImageFolder with Resize((S, S)), ToTensor,
Normalize(ImageNet); an 80/20 `random_split`; DataLoaders of batch 32 (shuffled for training, no
workers); VGG16 with frozen `features` and a new last layer; CrossEntropyLoss; SGD(lr 0.001, momentum 0.9)
over `vgg.classifier.parameters()`; 5 epochs; then the average test loss of the pretrained network and of
the fine-tuned one. Left out: W&B (the tl_dist side runs with --wandb-mode disabled) and the article's
`os.environ['CUDA_LAUNCH_BLOCKING'] = "1"`, a debugging setting that would make its GPU runs slower still.

Changed, and only so that both sides can be run on the same data and weights:
  --data-dir, --image-size, --epochs, --max-images (the first N of a seeded permutation of the folder),
  --weights PATH (a torchvision VGG16 state_dict loaded into `models.vgg16()` instead of
  `pretrained=True`; both the fine-tuned and the "pretrained" network start from it), --seed, --device;
  the last layer has one output per class folder (the article hard-codes 102, Caltech-101's folders);
  the evaluation also counts correct predictions (accuracy), which costs nothing.
It prints one JSON line (`RESULT {...}`) with its timings and results, read by bench.py.
"""

from __future__ import annotations

import argparse
import json
import time

T_START = time.perf_counter()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.optim as optim  # noqa: E402
import torchvision.transforms as transforms  # noqa: E402
from torch.utils.data import DataLoader, Subset, random_split  # noqa: E402
from torchvision import datasets, models  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="ImageFolder root: one sub-folder per class")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-images", type=int, default=0, help="use at most N images (0 = all)")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (the article's pretrained=True) or PATH to a VGG16 state_dict")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed at the start (the article sets none)")
    p.add_argument("--device", default=None, help="default: cuda:0 when available, else cpu (the article)")
    return p.parse_args(argv)


def load_vgg(weights: str) -> nn.Module:
    if weights == "imagenet":
        return models.vgg16(weights=models.VGG16_Weights.IMAGENET1K_V1)
    vgg = models.vgg16()
    vgg.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return vgg


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)

    # 3. Preprocess the dataset
    S = args.image_size
    transform = transforms.Compose([
        transforms.Resize((S, S)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    dataset = datasets.ImageFolder(root=args.data_dir, transform=transform)
    if args.max_images and args.max_images < len(dataset):
        dataset = Subset(dataset, torch.randperm(len(dataset))[:args.max_images].tolist())
    num_classes = len(dataset.classes if hasattr(dataset, "classes") else dataset.dataset.classes)
    total_size = len(dataset)
    train_size = int(0.8 * total_size)
    test_size = total_size - train_size
    train_dataset, test_dataset = random_split(dataset, [train_size, test_size])
    train_loader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_dataset, batch_size=args.batch_size, shuffle=False)

    # 5. Load and modify the pre-trained VGG model
    vgg = load_vgg(args.weights)
    for param in vgg.features.parameters():
        param.requires_grad = False
    num_features = vgg.classifier[6].in_features
    vgg.classifier[6] = nn.Linear(num_features, num_classes)  # Change the last layer
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    vgg.to(device)

    # 6. Transfer learning
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(vgg.classifier.parameters(), lr=0.001, momentum=0.9)

    def train_model(model, criterion, optimizer, num_epochs):
        losses = []
        for epoch in range(num_epochs):
            model.train()
            running_loss = 0.0
            for inputs, labels in train_loader:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                outputs = model(inputs)
                loss = criterion(outputs, labels)
                loss.backward()
                optimizer.step()
                running_loss += loss.item()
            epoch_loss = running_loss / len(train_loader)
            print(f"Epoch {epoch+1}, Loss: {epoch_loss}", flush=True)
            losses.append(epoch_loss)
        return losses

    # 7. Evaluating performance metrics (plus the number of correct predictions)
    def evaluate_model(model, criterion, loader):
        model.eval()
        total_loss = 0.0
        total = 0
        correct = 0
        with torch.no_grad():
            for inputs, labels in loader:
                inputs, labels = inputs.to(device), labels.to(device)
                outputs = model(inputs)
                loss = criterion(outputs, labels)
                total_loss += loss.item() * inputs.size(0)
                total += inputs.size(0)
                correct += (outputs.argmax(1) == labels).sum().item()
        average_loss = total_loss / total
        return average_loss, correct / total

    t_setup = time.perf_counter()
    epoch_losses = train_model(vgg, criterion, optimizer, num_epochs=args.epochs)
    t_train = time.perf_counter()

    # a. Pre-trained Model
    pretrained_vgg = load_vgg(args.weights).to(device)
    pretrained_test_loss, pretrained_accuracy = evaluate_model(pretrained_vgg, criterion, test_loader)
    del pretrained_vgg
    # b. Fine-tuned Model
    t_eval = time.perf_counter()
    test_loss, test_accuracy = evaluate_model(vgg, criterion, test_loader)
    t_end = time.perf_counter()
    print(f"pretrained test loss {pretrained_test_loss:.4f}; fine-tuned test loss {test_loss:.4f}, "
          f"accuracy {test_accuracy:.2%}")
    print("RESULT " + json.dumps({
        "train_images": train_size, "test_images": test_size, "epochs": args.epochs,
        "epoch_loss": epoch_losses, "pretrained_test_loss": pretrained_test_loss,
        "pretrained_accuracy": pretrained_accuracy, "test_loss": test_loss, "accuracy": test_accuracy,
        "seconds": {"setup": t_setup - T_START, "train": t_train - t_setup, "eval": t_end - t_eval,
                    "total": t_end - T_START},
        "train_images_per_second": train_size * args.epochs / (t_train - t_setup),
        "test_images_per_second": test_size / (t_end - t_eval), "device": str(device),
        "torch_threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
