"""Draw a run: LR and training loss against step, the GP's predicted curve at the switch, every AutoWU test.

    python launch/plot_run.py runs/cpu_digits            # writes runs/cpu_digits/autowu.png
    python launch/plot_run.py runs/rn50_4k --out rn50.png
"""
import argparse

from autowu.launcher.plot import plot_run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory of launch/train.py (holds log.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default: <run_dir>/autowu.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main()
