"""``python -m specialize`` (also what torchrun runs)."""

from specialize.cli import main

if __name__ == "__main__":  # megatron's checkpoint saver spawns helpers that re-import __main__
    main()
