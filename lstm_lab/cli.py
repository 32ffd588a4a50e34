"""The ``lstm-lab`` command line."""

from __future__ import annotations

import argparse
import sys


def _variants_table() -> str:
    from lstm_lab.cells import VARIANTS, CellSpec, DESCRIPTIONS

    defaults = CellSpec()
    rows = []
    for name, spec in VARIANTS.items():
        flags = [f"{k}={v}" for k, v in spec.flags().items() if k != "family" and v != getattr(defaults, k)]
        rows.append((name, spec.family, ", ".join(flags) or "-", f"{spec.num_params(128, 128):,}",
                     DESCRIPTIONS[name]))
    header = ("name", "family", "flags", "params@128", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i == 3 else '<'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstm-lab", description="LSTM-family cells, experiments and studies.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("variants", help="list every cell preset: family, flags, parameters at in = hidden = 128")
    demo = sub.add_parser("demo", help="train a small model on the adding problem (CPU, about a minute)")
    demo.add_argument("--cell", default="lstm", help="preset name (see `lstm-lab variants`)")
    demo.add_argument("--steps", type=int, default=400)
    demo.add_argument("--length", type=int, default=30, help="sequence length T")
    demo.add_argument("--hidden-size", type=int, default=32)
    demo.add_argument("--learning-rate", type=float, default=1e-2)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "variants":
        print(_variants_table())
    elif args.command == "demo":
        from lstm_lab.cells import resolve_cell
        from lstm_lab.demo import run_demo

        try:
            resolve_cell(args.cell)
        except ValueError as e:
            parser.error(str(e))
        run_demo(args.cell, steps=args.steps, length=args.length, hidden_size=args.hidden_size,
                 learning_rate=args.learning_rate, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
