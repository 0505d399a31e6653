import functools

import lightning as L
import timm
import torch
import torchvision
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import kd


class MyData(L.LightningDataModule):  # any data module yielding (images in [0, 1], labels)
    def train_dataloader(self, n=64):  # stand-in data
        return DataLoader(TensorDataset(torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))), batch_size=16)

    val_dataloader = functools.partialmethod(train_dataloader, n=32)


teacher = timm.create_model("test_resnet", num_classes=10)  # normalizes as its pretrained_cfg says
net = torchvision.models.mobilenet_v3_small(num_classes=10)  # no weights named: say how it normalizes
student = kd.as_classifier(net, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=(3, 32, 32))
module = kd.DistillationModule(
    student, kd.losses.HintonKD(temperature=4.0), teacher=teacher,
    optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=8),  # stepped every step
)  # fmt: skip
trainer = L.Trainer(max_steps=8, log_every_n_steps=1, logger=CSVLogger("logs"), enable_progress_bar=False)
trainer.fit(module, datamodule=MyData())  # LR per step in logs/; teacher frozen, outside the checkpoint
