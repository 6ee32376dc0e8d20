"""An image classifier trained in the style of pytorch/examples (mnist/main.py, with the
--resume of imagenet/main.py): argparse flags, an Adadelta optimizer with a StepLR
schedule, `Train Epoch: …` progress lines, and a checkpoint `checkpoint_epoch{N}.pth`
after every epoch. It knows nothing of ftrain; configs/examples/classifier.policy.yaml
tells ftrain how to drive it.

The data is made up so that nothing is downloaded: 8x8 grey images of ten classes, each a
fixed random pattern plus noise, the same for a given --seed.

    $ python scripts/examples/classifier/train.py --epochs 3 --lr 1.0
    $ python scripts/examples/classifier/train.py --epochs 5 --resume checkpoint_epoch3.pth

Rehearsal knobs, read from the environment so a supervisor can be tried on this script
without editing it:
  EXAMPLE_CRASH_AT=N   at global step N of a run started from scratch, reading the batch
                       fails with an I/O error (a flaky network file system, once)
  EXAMPLE_NAN_AT=N     at global step N of a run started from scratch a weight turns NaN
                       (silent data corruption on a flaky device, once)
  EXAMPLE_STEP_MS=T    every step takes at least T ms, as on a real device
"""

import argparse
import errno
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout(torch.flatten(x, 1))
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


def synthetic_digits(n, seed):
    """n images of 8x8 pixels in ten classes: a class pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (n,), generator=g)
    images = patterns[labels] + 0.6 * torch.randn(n, 1, 8, 8, generator=g)
    return TensorDataset((images - 0.5) / 0.5, labels)


def train(args, model, device, train_loader, optimizer, epoch, global_step):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        if global_step + 1 == args.crash_at and not args.resume:
            raise OSError(errno.EIO, os.strerror(errno.EIO), "data/train-00003-of-00008.bin")
        if args.step_s:
            time.sleep(args.step_s)
        if global_step + 1 == args.nan_at and not args.resume:
            with torch.no_grad():
                model.fc2.weight[0, 0] = float("nan")
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        global_step += 1
        if batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)} ({100.0 * batch_idx / len(train_loader):.0f}%)]\tLoss: {loss.item():.6f}\tStep: {global_step}")
            if args.dry_run:
                break
    return global_step


def test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(dim=1, keepdim=True).eq(target.view_as(output.argmax(dim=1, keepdim=True))).sum().item()
    test_loss /= len(test_loader.dataset)
    print(f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{len(test_loader.dataset)} ({100.0 * correct / len(test_loader.dataset):.0f}%)\n")


def main():
    parser = argparse.ArgumentParser(description="Synthetic digits example")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="input batch size for training (default: 64)")
    parser.add_argument("--test-batch-size", type=int, default=500, metavar="N",
                        help="input batch size for testing (default: 500)")
    parser.add_argument("--epochs", type=int, default=14, metavar="N", help="number of epochs to train (default: 14)")
    parser.add_argument("--lr", type=float, default=1.0, metavar="LR", help="learning rate (default: 1.0)")
    parser.add_argument("--gamma", type=float, default=0.7, metavar="M", help="learning rate step gamma (default: 0.7)")
    parser.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default: 1)")
    parser.add_argument("--train-size", type=int, default=3000, metavar="N", help="training images (default: 3000)")
    parser.add_argument("--log-interval", type=int, default=10, metavar="N",
                        help="how many batches to wait before logging training status")
    parser.add_argument("--dry-run", action="store_true", help="quickly check a single pass")
    parser.add_argument("--save-dir", default=".", metavar="DIR", help="where checkpoint_epoch{N}.pth go")
    parser.add_argument("--resume", default="", type=str, metavar="PATH", help="path to latest checkpoint (default: none)")
    args = parser.parse_args()
    args.crash_at = int(os.environ.get("EXAMPLE_CRASH_AT", -1))
    args.nan_at = int(os.environ.get("EXAMPLE_NAN_AT", -1))
    args.step_s = int(os.environ.get("EXAMPLE_STEP_MS", 0)) / 1000

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    train_loader = DataLoader(synthetic_digits(args.train_size, args.seed), batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(synthetic_digits(1000, args.seed + 1), batch_size=args.test_batch_size)

    model = Net().to(device)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    start_epoch, global_step = 1, 0
    if args.resume:
        if not os.path.isfile(args.resume):
            raise SystemExit(f"=> no checkpoint found at '{args.resume}'")
        print(f"=> loading checkpoint '{args.resume}'")
        checkpoint = torch.load(args.resume, map_location=device)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        for group in optimizer.param_groups:  # a new --lr wins over the one saved
            group["lr"] = args.lr * args.gamma ** checkpoint["epoch"]
        start_epoch, global_step = checkpoint["epoch"] + 1, checkpoint["global_step"]
        torch.set_rng_state(checkpoint["rng_state"])
        print(f"=> loaded checkpoint '{args.resume}' (epoch {checkpoint['epoch']}, step {global_step})")

    os.makedirs(args.save_dir, exist_ok=True)
    for epoch in range(start_epoch, args.epochs + 1):
        global_step = train(args, model, device, train_loader, optimizer, epoch, global_step)
        test(model, device, test_loader)
        scheduler.step()
        torch.save({"epoch": epoch, "global_step": global_step, "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng_state": torch.get_rng_state()},
                   os.path.join(args.save_dir, f"checkpoint_epoch{epoch}.pth"))


if __name__ == "__main__":
    main()
