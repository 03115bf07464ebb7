"""A minimal LightningModule + DataModule used to test the CLI plumbing independently of the model."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning as L

class Boring(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(hidden, 1)
    def training_step(self, batch, idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss
    def validation_step(self, batch, idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y))
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

class BoringData(L.LightningDataModule):
    def __init__(self, n: int = 64, hidden: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, hidden, generator=g); self.y = self.x.sum(1, keepdim=True)
    def train_dataloader(self): return DataLoader(TensorDataset(self.x, self.y), batch_size=16)
    def val_dataloader(self): return DataLoader(TensorDataset(self.x, self.y), batch_size=16)
