"""kd.distill from a notebook: a timm teacher, a timm student, plain DataLoaders of images in [0, 1]."""

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import kd

# Stand-ins for a real dataset; kd's models normalize for themselves, so images stay in [0, 1].
images, labels = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
train_loader = DataLoader(TensorDataset(images[:96], labels[:96]), batch_size=32, shuffle=True)
val_loader = DataLoader(TensorDataset(images[96:], labels[96:]), batch_size=32)

# In real use: a trained teacher, e.g. timm.create_model("resnet50", pretrained=True, num_classes=...).
teacher = timm.create_model("test_resnet", num_classes=10)
student = timm.create_model("test_efficientnet", num_classes=10)

results = kd.distill(
    teacher, student, train_loader, val_loader,
    loss="kd",                        # any conf/loss name, or an object such as kd.losses.HintonKD(temperature=2)
    epochs=2,
    optim={"lr": 0.05},               # like optim.lr=0.05 on python run.py's command line
    sched={"warmup_epochs": 0},
    output_dir="distill-run",         # results.json, student.safetensors + card, checkpoints, CSV logs
    logger="csv",
)  # fmt: skip
print(f"student top-1 {results['metrics']['student/top1']:.3f}, teacher unchanged: "
      f"{results['teacher_fingerprint']['start'] == results['teacher_fingerprint']['end']}")  # fmt: skip
