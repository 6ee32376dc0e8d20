# scripts/examples/lightning/train.py: a PyTorch Lightning job under ftrain (docs/integrations.md)
import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import ftrain
from ftrain.integrations.lightning import FtrainCallback, resume_checkpoint


class Regression(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


cfg = ftrain.config(defaults={"train": {"batch_size": 16, "lr": 0.05, "steps": 60}})
x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=cfg["train"]["batch_size"])
checkpoints = L.callbacks.ModelCheckpoint(dirpath="lit/checkpoints", every_n_train_steps=20, save_top_k=-1)
trainer = L.Trainer(max_steps=cfg["train"]["steps"], default_root_dir="lit", log_every_n_steps=5,
                    callbacks=[checkpoints, FtrainCallback()], enable_progress_bar=False, accelerator="cpu")
trainer.fit(Regression(cfg["train"]["lr"]), data, ckpt_path=resume_checkpoint("lit"))
