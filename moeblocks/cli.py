"""The ``moeblocks`` command line (placeholder until the SRA trainer lands)."""

from __future__ import annotations

import argparse
import sys

from moeblocks._version import __version__


def _demo(args: argparse.Namespace) -> int:
    import torch

    import moeblocks as mb

    torch.manual_seed(0)
    router = mb.Router(mb.CosineScorer(dim=64, num_experts=8), schedule=2)
    layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.SwiGLUExperts(8, 64, 128),
                        losses={"bandpass": mb.BandpassLoss(floor=0.05, ceiling=0.25)})
    x = torch.randn(4, 32, 64)
    res = layer(x)
    (res.out.square().mean() + res.total_aux_loss()).backward()
    print(f"forward+backward ok: out {tuple(res.out.shape)}, aux {float(res.total_aux_loss()):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moeblocks`` console script."""
    parser = argparse.ArgumentParser(prog="moeblocks", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moeblocks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="build a layer and run a forward/backward")
    args = parser.parse_args(argv)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
