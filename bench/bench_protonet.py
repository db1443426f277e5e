"""ProtoNet training-loop speed: pymeta against a per-image pipeline and a plain-torch loop.

    python bench/bench_protonet.py [--rounds R] [--steps S] [--ways 20 --shots 5 --queries 5]

Everything is measured side by side in one process, interleaved round by round, and
reported as medians per episode and ratios (bench/RESULTS.md). Needs Omniglot's
images_background_small1.zip under $PYMETA_DATA/omniglot or ../shared/data/omniglot.

Contenders:
- per-image: an image-folder dataset that decodes one PNG per item under an episodic batch
  sampler (how easyfsl users run it), feeding a plain-torch ProtoNet.
- plain: the same cached uint8 tensors as pymeta, a plain-torch ProtoNet (torch.cdist,
  reshape-mean), default memory format; and the same with channels_last.
- pymeta: EpisodeSampler + pymeta.learners.ProtoNet, as `pymeta train` runs it.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pymeta._atomic import write_json
from pymeta.data import EpisodeSampler
from pymeta.data.omniglot import load_omniglot
from pymeta.learners import ProtoNet
from pymeta.nn import Conv4

OUT = Path(__file__).resolve().parent / "out" / "protonet.json"


def data_root() -> Path:
    env = os.environ.get("PYMETA_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (root / "omniglot" / "images_background_small1.zip").exists():
        raise SystemExit(f"images_background_small1.zip not found under {root}/omniglot; "
                         f"set PYMETA_DATA")
    return root


class PngFolder(Dataset):
    """The per-image baseline: every item opens, decodes and resizes one PNG."""

    def __init__(self, root: Path, size: int = 28):
        self.files, self.labels = [], []
        for label, d in enumerate(sorted(p for p in root.glob("*/*") if p.is_dir())):
            for f in sorted(d.glob("*.png")):
                self.files.append(f)
                self.labels.append(label)
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = Image.open(self.files[i]).convert("L").resize((self.size, self.size),
                                                            Image.LANCZOS)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        return 1.0 - x.unsqueeze(0), self.labels[i]  # strokes = 1, as pymeta's preprocessing


class TaskBatchSampler:
    """N-way (K+Q)-image episodes of indices, class-major, as an episodic batch sampler."""

    def __init__(self, labels, ways, per_class, episodes, seed=0):
        self.by_class = {}
        for i, y in enumerate(labels):
            self.by_class.setdefault(y, []).append(i)
        self.ways, self.per_class, self.episodes = ways, per_class, episodes
        self.rng = random.Random(seed)

    def __len__(self):
        return self.episodes

    def __iter__(self):
        for _ in range(self.episodes):
            classes = self.rng.sample(sorted(self.by_class), self.ways)
            yield [i for c in classes for i in self.rng.sample(self.by_class[c], self.per_class)]


def split_episode(x, n, k, q):
    x = x.view(n, k + q, *x.shape[1:])
    return (x[:, :k].reshape(n * k, *x.shape[2:]), x[:, k:].reshape(n * q, *x.shape[2:]))


def plain_protonet_loss(model, support, query, n, k, q, channels_last=False):
    x = torch.cat([support, query])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    z = model(x)
    protos = z[: n * k].view(n, k, -1).mean(1)
    logits = -torch.cdist(z[n * k:], protos).pow(2)
    return F.cross_entropy(logits, torch.arange(n).repeat_interleave(q))


def make_model(channels_last=False):
    torch.manual_seed(0)
    return Conv4(in_channels=1, channels_last=channels_last)


def pymeta_model():
    torch.manual_seed(0)
    return Conv4(in_channels=1)   # pymeta's defaults, as `pymeta train` builds it


def step(model, opt, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def contenders(args, store, png_root):
    n, k, q = args.ways, args.shots, args.queries
    sampler = EpisodeSampler(store, n, k, q, tasks=1, seed=0)
    png = PngFolder(png_root)
    png_loader = lambda: iter(DataLoader(png, batch_sampler=TaskBatchSampler(  # noqa: E731
        png.labels, n, k + q, 10 ** 9)))
    loaders = {"assemble per-image": png_loader(), "loop per-image": png_loader()}
    counter = {"i": 0}

    def next_episode():
        counter["i"] += 1
        ep = sampler[counter["i"]]
        return ep.support_x[0], ep.query_x[0]

    def plain(cl):
        m = make_model(cl)
        o = torch.optim.Adam(m.parameters(), 1e-3)
        return lambda: step(m, o, plain_protonet_loss(m, *next_episode(), n, k, q, cl))

    def per_image():
        m = make_model()
        o = torch.optim.Adam(m.parameters(), 1e-3)

        def run():
            x, _ = next(loaders["loop per-image"])
            step(m, o, plain_protonet_loss(m, *split_episode(x, n, k, q), n, k, q))
        return run

    def pymeta_loop():
        learner = ProtoNet(pymeta_model())
        o = torch.optim.Adam(learner.parameters(), 1e-3)

        def run():
            counter["i"] += 1
            ep = sampler[counter["i"]]
            loss, _ = learner.loss(ep.support_x, ep.support_y, ep.query_x, ep.query_y, n)
            step(learner, o, loss)
        return run

    return {
        "assemble per-image": lambda: next(loaders["assemble per-image"]),
        "assemble pymeta": lambda: sampler[random.randrange(10 ** 6)],
        "loop per-image": per_image(),
        "loop plain": plain(False),
        "loop plain channels_last": plain(True),
        "loop pymeta": pymeta_loop(),
    }


def measure(fns, rounds, steps):
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(steps):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def report(med, args):
    rows = [("episode assembly", "assemble pymeta", "assemble per-image", 20.0),
            ("training loop vs per-image", "loop pymeta", "loop per-image", 1.2),
            ("training loop vs plain", "loop pymeta", "loop plain", 1.1),
            ("training loop vs plain channels_last", "loop pymeta",
             "loop plain channels_last", None)]
    print(f"ProtoNet conv4 {args.ways}-way {args.shots}-shot {args.queries}-query, "
          f"meta-batch 1, {torch.get_num_threads()} threads; median ms per episode")
    for name, t in med.items():
        print(f"  {name:<28} {1e3 * t:9.2f} ms  ({1 / t:8.1f} episodes/s)")
    out = []
    for label, ours, theirs, goal in rows:
        ratio = med[theirs] / med[ours]
        verdict = "" if goal is None else ("PASS" if ratio >= goal else "FAIL")
        goal_s = "-" if goal is None else f">= {goal}x"
        print(f"  {label:<40} {ratio:6.2f}x  goal {goal_s:<8} {verdict}")
        out.append({"row": label, "ratio": ratio, "goal": goal})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ways", type=int, default=20)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="episodes per contender per round")
    p.add_argument("--json", type=Path, default=OUT, help="results file (default bench/out/protonet.json)")
    args = p.parse_args()
    root = data_root()
    store = load_omniglot("small1", root)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(root / "omniglot" / "images_background_small1.zip") as z:
            z.extractall(tmp)
        med = measure(contenders(args, store, Path(tmp) / "images_background_small1"),
                      args.rounds, args.steps)
    rows = report(med, args)
    write_json(args.json, {"median_s": med, "ratios": rows,
                           "args": {k: str(v) for k, v in vars(args).items()},
                           "threads": torch.get_num_threads()})
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
