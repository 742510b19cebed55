"""AdamWR and SGDWR in miniature (Loshchilov & Hutter, arXiv 1711.05101, figure 4).

    python examples/adamwr.py                  # writes adamwr.png and lr_range_test.png
    python examples/adamwr.py --out docs/images

A small MLP learns a noisy generated classification task (a random "teacher"
network labels Gaussian inputs, 20% of the training labels are flipped), so that
it overfits and regularization shows. Four runs share the data, the init and the
warm-restart schedule (CosineAnnealingWarmRestarts, periods of 2, 4, 8 and 16
epochs):
  * AdamWR: fusedopt.AdamW with decouple_lr=True, so the decay is eta_t * lambda, and
    lambda normalized to each restart period (fusedopt.RestartNormalizedWeightDecay);
  * Adam with L2 weight decay (the coupled form the paper improves on);
  * SGDWR: fusedopt.SGDW, momentum 0.9, decoupled and normalized decay;
  * SGD with momentum and L2 weight decay (torch.optim.SGD).
The first picture shows training loss, test error, the learning rate and the decay
applied per step; the second the LR range test (torch-lr-finder) on fusedopt.AdamW
and fusedopt.SGDW. 5-12 s on one CPU core.
"""
import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fusedopt  # noqa: E402

INPUTS, CLASSES, WIDTH = 16, 4, 256
TRAIN, TEST, BATCH = 2048, 4096, 64
PERIOD_EPOCHS, PERIOD_GROWTH = 2, 2  # T_0 and T_mult
LAMBDA_NORM = {"AdamWR": 0.1, "SGDWR": 0.1}  # the paper's lambda_norm, before normalization
L2 = {"Adam + L2": 1e-3, "SGD + L2": 1e-3}
BASE_LR = {"adam": 3e-3, "sgd": 0.1}


def make_data(seed):
    """Gaussian inputs labelled by a random teacher MLP; a fifth of the training labels flipped."""
    generator = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(INPUTS, 32, generator=generator), torch.randn(32, CLASSES, generator=generator)]

    def label(x):
        return (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(dim=1)

    x_train = torch.randn(TRAIN, INPUTS, generator=generator)
    y_train = label(x_train)
    flipped = torch.rand(TRAIN, generator=generator) < 0.2
    y_train[flipped] = torch.randint(0, CLASSES, (int(flipped.sum()),), generator=generator)
    x_test = torch.randn(TEST, INPUTS, generator=generator)
    return x_train, y_train, x_test, label(x_test)


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(INPUTS, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, CLASSES))


def decay_groups(model):
    """Weights decay; biases do not (the usual split, and the paper's)."""
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def make_optimizer(name, model):
    groups = decay_groups(model)
    if name == "AdamWR":
        return fusedopt.AdamW(groups, lr=BASE_LR["adam"], weight_decay=1.0, decouple_lr=True)
    if name == "Adam + L2":
        return fusedopt.Adam(groups, lr=BASE_LR["adam"], weight_decay=L2[name])
    if name == "SGDWR":
        return fusedopt.SGDW(groups, lr=BASE_LR["sgd"], momentum=0.9, weight_decay=1.0, decouple_lr=True)
    return torch.optim.SGD(groups, lr=BASE_LR["sgd"], momentum=0.9, weight_decay=L2[name])


def train(name, data, epochs, seed):
    x_train, y_train, x_test, y_test = data
    model = make_model(seed)
    optimizer = make_optimizer(name, model)
    steps_per_epoch = TRAIN // BATCH
    # Stepped once per batch, so its periods count batches.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=PERIOD_EPOCHS * steps_per_epoch, T_mult=PERIOD_GROWTH)
    if name in LAMBDA_NORM:
        fusedopt.RestartNormalizedWeightDecay(
            scheduler, LAMBDA_NORM[name], batch_size=BATCH, dataset_size=TRAIN,
            steps_per_epoch=steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    history = {"loss": [], "lr": [], "decay": [], "test_error": []}
    for _ in range(epochs):
        order = torch.randperm(TRAIN, generator=generator)
        for batch in order.split(BATCH):
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            group = optimizer.param_groups[0]
            # The decay this step applied, as a fraction of each weight.
            decay = group["lr"] / group["lr_max"] * group["weight_decay"] if group.get("decouple_lr") else 0.0
            history["loss"].append(loss.item())
            history["lr"].append(group["lr"])
            history["decay"].append(decay)
            scheduler.step()
        with torch.no_grad():
            history["test_error"].append((model(x_test).argmax(dim=1) != y_test).float().mean().item())
    return history


def smooth(values, weight=0.9):
    out, running = [], values[0]
    for value in values:
        running = weight * running + (1 - weight) * value
        out.append(running)
    return out


def plot_training(histories, path):
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colors = {"AdamWR": "tab:blue", "Adam + L2": "tab:cyan", "SGDWR": "tab:red", "SGD + L2": "tab:orange"}
    steps_per_epoch = TRAIN // BATCH
    for name, history in histories.items():
        axes[0, 0].plot(smooth(history["loss"]), color=colors[name], label=name)
        epochs = range(1, len(history["test_error"]) + 1)
        axes[0, 1].plot(epochs, [100 * e for e in history["test_error"]], color=colors[name], label=name)
        if name in LAMBDA_NORM:
            axes[1, 0].plot(history["lr"], color=colors[name], label=name)
            axes[1, 1].plot(history["decay"], color=colors[name], label=name)
    axes[0, 0].set(title="training loss (smoothed)", xlabel="step", yscale="log")
    axes[0, 1].set(title="test error (%)", xlabel="epoch")
    axes[1, 0].set(title="learning rate: cosine annealing, warm restarts", xlabel="step", yscale="log")
    axes[1, 1].set(title="decay per step: eta_t * lambda, lambda normalized per period", xlabel="step")
    restarts, length, start = [], PERIOD_EPOCHS * steps_per_epoch, 0
    while start + length < len(next(iter(histories.values()))["loss"]):
        start += length
        length *= PERIOD_GROWTH
        restarts.append(start)
    for axis in (axes[0, 0], axes[1, 0], axes[1, 1]):
        for restart in restarts:
            axis.axvline(restart, color="grey", linewidth=0.5, linestyle=":")
    for axis in axes.flat:
        axis.legend(fontsize=8)
    figure.suptitle("AdamWR and SGDWR against Adam and SGD with L2 decay (fusedopt, CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_lr_range_test(data, path, seed):
    """Leslie Smith's LR range test with torch-lr-finder, driving fusedopt optimizers."""
    from torch_lr_finder import LRFinder

    x_train, y_train = data[0], data[1]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=BATCH, shuffle=True,
        generator=torch.Generator().manual_seed(seed))
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for name, make, start in (("fusedopt.AdamW", lambda p: fusedopt.AdamW(p, lr=1e-6), 1e-6),
                              ("fusedopt.SGDW", lambda p: fusedopt.SGDW(p, lr=1e-4, momentum=0.9), 1e-4)):
        model = make_model(seed)
        finder = LRFinder(model, make(model.parameters()), torch.nn.CrossEntropyLoss())
        finder.range_test(loader, start_lr=start, end_lr=10, num_iter=100)
        axis.plot(finder.history["lr"], finder.history["loss"], label=name)
        finder.reset()  # model and optimizer back to their state before the test
    top = 1.15 * max(line.get_ydata()[0] for line in axis.get_lines())
    axis.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)",
             title="LR range test (torch-lr-finder)", ylim=(None, top))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for the two PNGs")
    parser.add_argument("--epochs", type=int, default=30, help="2 + 4 + 8 + 16: four restart periods")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = make_data(args.seed)
    started = time.perf_counter()
    histories = {name: train(name, data, args.epochs, args.seed)
                 for name in ("AdamWR", "Adam + L2", "SGDWR", "SGD + L2")}
    for name, history in histories.items():
        print(f"{name:10s} final test error {100 * history['test_error'][-1]:5.1f}%  "
              f"best {100 * min(history['test_error']):5.1f}%  final train loss {history['loss'][-1]:.3f}")
    plot_training(histories, os.path.join(args.out, "adamwr.png"))
    plot_lr_range_test(data, os.path.join(args.out, "lr_range_test.png"), args.seed)
    print(f"wrote adamwr.png and lr_range_test.png to {args.out} in {time.perf_counter() - started:.1f} s")
    return histories


if __name__ == "__main__":
    torch.set_num_threads(1)  # a model this small gains nothing from more threads
    main()
